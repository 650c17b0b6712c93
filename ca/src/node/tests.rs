//! How a burst of events merges into one sync update for one agent.

use std::sync::Arc;

use spiffe::{SpiffeId, TrustDomain};

use super::{Applied, Caller, Pending};
use crate::entry::{EntrySpec, RegistrationEntry};
use crate::service::CaEvent;

const A: &str = "spiffe://example.org/meshid/agent/join_token/a";
const B: &str = "spiffe://example.org/meshid/agent/join_token/b";

fn id(s: &str) -> SpiffeId {
    SpiffeId::new(s).unwrap()
}

/// A stream of agent `s`, opened with the SVID of serial `aa`.
fn caller(s: &str) -> Caller {
    Caller {
        id: id(s),
        not_after: i64::MAX,
        serial: "aa".to_owned(),
    }
}

fn entry(name: &str, parent: &str, revision: i64) -> Arc<RegistrationEntry> {
    let mut e = EntrySpec {
        id: Some(name.into()),
        spiffe_id: format!("spiffe://example.org/w/{name}"),
        parent_id: parent.into(),
        selectors: vec!["unix:uid:1".into()],
        ..Default::default()
    }
    .validate(&TrustDomain::new("example.org").unwrap(), 0)
    .unwrap();
    e.revision = revision;
    Arc::new(e)
}

fn upsert(name: &str, parent: &str, old_parent: Option<&str>, revision: i64) -> CaEvent {
    CaEvent::EntryUpserted {
        entry: entry(name, parent, revision),
        old_parent: old_parent.map(id),
    }
}

fn delete(name: &str, parent: &str) -> CaEvent {
    CaEvent::EntryDeleted {
        id: name.parse().unwrap(),
        parent: id(parent),
    }
}

/// Applies events for agent A; returns (upserted ids with revisions, deleted ids, bundle).
fn merge(events: Vec<CaEvent>) -> (Vec<(String, i64)>, Vec<String>, bool) {
    let mut p = Pending::default();
    for ev in events {
        assert_eq!(p.apply(ev, &caller(A)), Applied::Merged);
    }
    (
        p.upserts
            .values()
            .map(|e| (e.id.clone(), e.revision))
            .collect(),
        p.deleted.iter().cloned().collect(),
        p.bundle,
    )
}

#[test]
fn the_last_change_of_each_entry_wins() {
    let up = |n: &str, r| (n.to_owned(), r);
    // Created then updated: one upsert, the latest revision.
    assert_eq!(
        merge(vec![upsert("x", A, None, 1), upsert("x", A, Some(A), 2)]),
        (vec![up("x", 2)], vec![], false)
    );
    // Created then deleted: a delete only.
    assert_eq!(
        merge(vec![upsert("x", A, None, 1), delete("x", A)]),
        (vec![], vec!["x".into()], false)
    );
    // Deleted then created again: an upsert only.
    assert_eq!(
        merge(vec![delete("x", A), upsert("x", A, None, 1)]),
        (vec![up("x", 1)], vec![], false)
    );
    // Moved away from A: a delete; moved to A: an upsert.
    assert_eq!(
        merge(vec![upsert("x", B, Some(A), 2), upsert("y", A, Some(B), 3)]),
        (vec![up("y", 3)], vec!["x".into()], false)
    );
}

#[test]
fn other_agents_changes_are_ignored() {
    assert_eq!(
        merge(vec![
            upsert("x", B, None, 1),
            upsert("x", B, Some(B), 2),
            delete("y", B),
            CaEvent::AgentRemoved { spiffe_id: id(B) },
        ]),
        (vec![], vec![], false)
    );
    let mut p = Pending::default();
    assert_eq!(p.apply(CaEvent::BundleChanged, &caller(A)), Applied::Merged);
    assert!(p.bundle && !p.is_empty());
    assert_eq!(
        p.apply(CaEvent::AgentRemoved { spiffe_id: id(A) }, &caller(A)),
        Applied::AgentRemoved
    );
    // A renewal supersedes the streams of the agent opened with another SVID only.
    let renewed = |agent: &str, serial: &str| CaEvent::AgentRenewed {
        spiffe_id: id(agent),
        serial: serial.into(),
    };
    assert_eq!(p.apply(renewed(A, "bb"), &caller(A)), Applied::Superseded);
    assert_eq!(p.apply(renewed(A, "aa"), &caller(A)), Applied::Merged);
    assert_eq!(p.apply(renewed(B, "bb"), &caller(A)), Applied::Merged);
}
