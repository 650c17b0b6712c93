//! The console's shared state: the CA, who may read, the audit-fed view, and the entries the
//! identities page searches, with how they are loaded.

use std::net::SocketAddr;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::sync::watch;

use super::{access, view};
use crate::config::ConsoleConfig;
use crate::entry::RegistrationEntry;
use crate::service::Ca;

/// The most frequent change events (the pages re-read no faster).
pub const EVENT_INTERVAL: Duration = Duration::from_secs(1);

/// An entry with the text the identities search looks in.
#[derive(Debug)]
pub struct EntryRow {
    /// The entry.
    pub entry: RegistrationEntry,
    /// Lower-case SPIFFE ID, parent, selectors and id.
    pub haystack: String,
}

/// The console's state, shared by its handlers.
#[derive(Debug)]
pub struct Console {
    /// The CA.
    pub ca: Ca,
    /// Tokens and sessions.
    pub access: access::Access,
    /// The audit-fed view.
    pub view: RwLock<view::View>,
    /// Every entry, by SPIFFE ID, re-read when the audit log shows an entry change.
    pub entries: ArcSwap<Vec<EntryRow>>,
    /// The last audit seq the view has applied; moves when something changed.
    pub changes: watch::Sender<i64>,
    /// The console's address, as configured.
    pub address: SocketAddr,
    /// Served over HTTPS.
    pub https: bool,
}

impl Console {
    /// The console for `ca` as `config` says; [`Console::load`] fills its view.
    pub fn new(ca: Ca, config: &ConsoleConfig) -> Arc<Self> {
        Arc::new(Self {
            ca,
            access: access::Access::new(
                !config.tls(),
                config.admins.clone(),
                config.token_ttl,
                config.session_ttl,
            ),
            view: RwLock::new(view::View::default()),
            entries: ArcSwap::from_pointee(Vec::new()),
            changes: watch::channel(0).0,
            address: config.address,
            https: config.tls(),
        })
    }

    /// Reads every entry into the search cache.
    pub async fn reload_entries(&self) -> anyhow::Result<()> {
        let mut entries = self.ca.store.list_entries().await?;
        entries.sort_by(|a, b| {
            (a.spiffe_id.to_string(), a.id.to_string())
                .cmp(&(b.spiffe_id.to_string(), b.id.to_string()))
        });
        let rows = entries
            .into_iter()
            .map(|entry| {
                let mut haystack = format!("{} {} {}", entry.spiffe_id, entry.parent_id, entry.id);
                for s in &entry.selectors {
                    haystack.push(' ');
                    haystack.push_str(&s.to_string());
                }
                EntryRow {
                    entry,
                    haystack: haystack.to_lowercase(),
                }
            })
            .collect();
        self.entries.store(Arc::new(rows));
        Ok(())
    }

    /// Fills the view: the issuances of the last day (and of the longest SVID lifetime before
    /// it), then the most recent records for the activity page. Returns the last seq read.
    pub async fn load(&self) -> anyhow::Result<i64> {
        let head = self.ca.store.audit_head().await?.map_or(0, |(seq, _)| seq);
        let now = crate::unix_now();
        let since = now - view::WINDOW_HOURS * 3600 - self.ca.authority.longest_x509_ttl_s();
        const KINDS: &[&str] = &[
            "svid.x509.issued",
            "entry.rotated",
            "entry.deleted",
            "denials.reported",
        ];
        let mut after = 0;
        let mut view = view::View::default();
        loop {
            let page = self
                .ca
                .store
                .audit_records_since(since, KINDS, after, 10_000)
                .await?;
            let Some(last) = page.last() else { break };
            after = last.seq;
            for r in page.iter().filter(|r| r.seq <= head) {
                if let Ok(d) = serde_json::from_str::<serde_json::Value>(&r.details) {
                    view.index(r.time, &r.kind, &r.actor, &d);
                }
            }
            if after >= head {
                break;
            }
        }
        let first = (head - view::RECENT as i64).max(0);
        for r in self
            .ca
            .store
            .audit_records(first, view::RECENT as i64)
            .await?
        {
            if r.seq > head {
                break;
            }
            let d = serde_json::from_str(&r.details).unwrap_or(serde_json::Value::Null);
            view.remember(r.seq, r.time, &r.kind, &r.actor, &d);
        }
        view.seq = head;
        *self.view.write().unwrap_or_else(|p| p.into_inner()) = view;
        self.reload_entries().await?;
        self.changes.send_replace(head);
        Ok(head)
    }
}
