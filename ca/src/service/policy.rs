//! The central policy (`meshid-ca policy`): named policy documents (for example one per team or
//! namespace) in the CA's datastore, versioned together.
//!
//! Every change makes a numbered revision holding the whole set as it stood after the change,
//! with who made it, why, and (in its audit record) the diff. A document is validated with
//! meshid-policy before anything changes: an invalid one is refused with its file:line:column,
//! and the documents of a set must merge into one policy ([`meshid_policy::Policy::merge`]:
//! the same `default` and `mode`, ports declared alike, unique rule names; any matching deny
//! wins, otherwise any matching allow, otherwise the shared default).
//! Applying a document identical to the one in force changes nothing and says so; `dry_run`
//! shows the diff without changing anything. A rollback makes a new revision equal to an old
//! one: history is never rewritten.

use std::collections::BTreeMap;
use std::sync::Arc;

use super::{check_reason, invalid, Awaited, Ca, ServiceError};
use crate::audit::AuditEvent;
use crate::store::{PolicyRevision, StoreError};

/// The longest document name.
pub const MAX_POLICY_NAME: usize = 63;

/// At most this many named documents in force at once.
pub const MAX_POLICY_DOCUMENTS: usize = 256;

/// What a change did (or, with `dry_run`, would do).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyChange {
    /// The revision made; when nothing changed (or a dry run), the one in force (0: none).
    pub revision: u64,
    /// Whether the documents differ from the revision in force.
    pub changed: bool,
    /// A unified diff of the documents that changed, against the revision in force.
    pub diff: String,
    /// Whether this was a dry run (nothing was written).
    pub dry_run: bool,
}

/// Checks a document name: lowercase letters, digits, `.`, `_` and `-`, starting with a letter
/// or digit, at most [`MAX_POLICY_NAME`] bytes.
pub fn check_policy_name(name: &str) -> Result<(), ServiceError> {
    let ok = !name.is_empty()
        && name.len() <= MAX_POLICY_NAME
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b))
        && name.as_bytes()[0].is_ascii_alphanumeric();
    if ok {
        Ok(())
    } else {
        Err(invalid(
            "name",
            format!(
                "{name:?}: use lowercase letters, digits, '.', '_' and '-', starting with a \
                 letter or digit, at most {MAX_POLICY_NAME} characters"
            ),
        ))
    }
}

/// A unified diff, per document, from `old` to `new` (documents only in one are added or
/// removed whole).
pub fn policy_diff(old: &BTreeMap<String, String>, new: &BTreeMap<String, String>) -> String {
    let mut out = String::new();
    let names: std::collections::BTreeSet<&String> = old.keys().chain(new.keys()).collect();
    for name in names {
        let (a, b) = (
            old.get(name).map_or("", String::as_str),
            new.get(name).map_or("", String::as_str),
        );
        if old.get(name) == new.get(name) {
            continue;
        }
        let label = |present: bool| {
            if present {
                name.to_string()
            } else {
                "/dev/null".to_owned()
            }
        };
        let diff = similar::TextDiff::from_lines(a, b);
        out.push_str(
            &diff
                .unified_diff()
                .context_radius(3)
                .header(
                    &label(old.contains_key(name)),
                    &label(new.contains_key(name)),
                )
                .to_string(),
        );
        if !out.ends_with('\n') {
            out.push('\n');
        }
    }
    out
}

/// Validates every document of a set and merges them ([`meshid_policy::Policy::merge`]: they
/// must agree on `default` and `mode`, ports and rule names). Errors name the document (its
/// `origin` for the one being applied) with line and column.
pub fn merge_set(
    documents: &BTreeMap<String, String>,
    applied: Option<(&str, &str)>,
) -> Result<meshid_policy::Policy, ServiceError> {
    merge_located(documents, |name| match applied {
        Some((n, origin)) if n == name => Some(Located {
            origin,
            line_offset: 0,
            column_offset: 0,
        }),
        _ => None,
    })
}

/// Where a document's text is, for the positions in its errors: the file, and where the text
/// starts in it (an inline document of a mesh file).
#[derive(Debug, Clone, Copy)]
pub struct Located<'a> {
    /// The file.
    pub origin: &'a str,
    /// Added to error lines.
    pub line_offset: usize,
    /// Added to error columns.
    pub column_offset: usize,
}

/// [`merge_set`], with errors in the documents `locate` knows positioned in their files (the
/// others are named by their document name).
pub fn merge_located<'a>(
    documents: &BTreeMap<String, String>,
    locate: impl Fn(&str) -> Option<Located<'a>>,
) -> Result<meshid_policy::Policy, ServiceError> {
    if documents.len() > MAX_POLICY_DOCUMENTS {
        return Err(invalid(
            "name",
            format!("at most {MAX_POLICY_DOCUMENTS} policy documents may be in force"),
        ));
    }
    // Each document is parsed under its own name, so that an error of the merge can be traced
    // back to its document, and then told in the file's terms.
    let relocate = |e: meshid_policy::PolicyError| {
        let located = match &e {
            meshid_policy::PolicyError::Syntax { origin, .. }
            | meshid_policy::PolicyError::Invalid { origin, .. } => locate(origin),
            _ => None,
        };
        let reason = match (located, e.location()) {
            (Some(l), Some((line, column))) => format!(
                "{}:{}:{}: {}",
                l.origin,
                line + l.line_offset,
                column + l.column_offset,
                e.message()
            ),
            _ => e.to_string(),
        };
        invalid("policy", reason)
    };
    let parts = documents
        .iter()
        .map(|(name, text)| meshid_policy::Policy::parse(text, name).map_err(relocate))
        .collect::<Result<Vec<_>, _>>()?;
    meshid_policy::Policy::merge("mesh", &parts).map_err(relocate)
}

/// What a change is, for its revision and audit record.
struct Step<'a> {
    action: &'a str,
    subject: &'a str,
    reason: &'a str,
    author: &'a str,
}

impl Ca {
    /// `meshid-ca policy apply`: document `name` becomes `text` (validated first, with
    /// `origin` naming the file in error positions).
    pub async fn apply_policy(
        &self,
        name: &str,
        text: &str,
        origin: &str,
        reason: &str,
        author: &str,
        dry_run: bool,
    ) -> Result<PolicyChange, ServiceError> {
        check_policy_name(name)?;
        check_reason(reason)?;
        let origin = if origin.is_empty() { name } else { origin };
        // The document alone first, so that its errors name the operator's file.
        meshid_policy::Policy::parse(text, origin).map_err(|e| invalid("policy", e.to_string()))?;
        let applied = Some((name, origin));
        let step = Step {
            action: "apply",
            subject: name,
            reason,
            author,
        };
        // A document a mesh file declared keeps its owner: the next apply of that file shows
        // this change as drift.
        self.change_policy(step, dry_run, applied, |docs, _owners| {
            docs.insert(name.to_owned(), text.to_owned());
            Ok(())
        })
        .await
    }

    /// `meshid-ca policy delete`: document `name` leaves the policy.
    pub async fn delete_policy(
        &self,
        name: &str,
        reason: &str,
        author: &str,
        dry_run: bool,
    ) -> Result<PolicyChange, ServiceError> {
        check_policy_name(name)?;
        check_reason(reason)?;
        let step = Step {
            action: "delete",
            subject: name,
            reason,
            author,
        };
        self.change_policy(step, dry_run, None, |docs, owners| {
            owners.remove(name);
            docs.remove(name)
                .map(|_| ())
                .ok_or_else(|| StoreError::NotFound(format!("policy document {name}")).into())
        })
        .await
    }

    /// `meshid-ca policy rollback`: a new revision with the documents of revision `to`.
    pub async fn rollback_policy(
        &self,
        to: u64,
        reason: &str,
        author: &str,
        dry_run: bool,
    ) -> Result<PolicyChange, ServiceError> {
        check_reason(reason)?;
        let target = self
            .store
            .get_policy_revision(Some(to))
            .await?
            .ok_or_else(|| StoreError::NotFound(format!("policy revision {to}")))?;
        let subject = to.to_string();
        let step = Step {
            action: "rollback",
            subject: &subject,
            reason,
            author,
        };
        self.change_policy(step, dry_run, None, |docs, owners| {
            *docs = target.documents.clone();
            *owners = target.owners.clone();
            Ok(())
        })
        .await
    }

    /// A revision with its documents (the newest for `None`).
    pub async fn policy_revision(
        &self,
        revision: Option<u64>,
    ) -> Result<Option<PolicyRevision>, ServiceError> {
        Ok(self.store.get_policy_revision(revision).await?)
    }

    /// The revision in force, as this server last read it (`None`: no policy applied yet).
    pub fn policy_in_force(&self) -> Option<Arc<PolicyRevision>> {
        self.policy
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Reads the newest revision from the datastore; when it is not the one held, holds it and
    /// tells the agents (at start, after a change here, and when another server made one).
    pub async fn refresh_policy(&self) -> Result<bool, ServiceError> {
        let head = self.store.get_policy_revision(None).await?;
        {
            let mut held = self
                .policy
                .write()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if held.as_ref().map(|h| h.revision) == head.as_ref().map(|h| h.revision) {
                return Ok(false);
            }
            *held = head.map(Arc::new);
        }
        self.publish(super::CaEvent::PolicyChanged);
        Ok(true)
    }

    /// Every revision, oldest first (without documents).
    pub async fn policy_history(&self) -> Result<Vec<PolicyRevision>, ServiceError> {
        Ok(self.store.list_policy_revisions().await?)
    }

    /// Applies `change` to the documents in force, validates the result, and records it as a
    /// new revision with its audit record (unless nothing changed, or `dry_run`).
    async fn change_policy(
        &self,
        step: Step<'_>,
        dry_run: bool,
        applied: Option<(&str, &str)>,
        change: impl FnOnce(
            &mut BTreeMap<String, String>,
            &mut BTreeMap<String, String>,
        ) -> Result<(), ServiceError>,
    ) -> Result<PolicyChange, ServiceError> {
        let head = self.store.get_policy_revision(None).await?;
        let (current, old, mut owners) = head.map_or((0, BTreeMap::new(), BTreeMap::new()), |h| {
            (h.revision, h.documents, h.owners)
        });
        let mut docs = old.clone();
        change(&mut docs, &mut owners)?;
        merge_set(&docs, applied)?;
        let Step {
            action,
            subject,
            reason,
            author,
        } = step;
        let diff = policy_diff(&old, &docs);
        let changed = docs != old;
        if !changed || dry_run {
            return Ok(PolicyChange {
                revision: current,
                changed,
                diff,
                dry_run,
            });
        }
        let revision = PolicyRevision {
            revision: current + 1,
            created_at: crate::unix_now(),
            author: author.to_owned(),
            reason: reason.to_owned(),
            action: action.to_owned(),
            subject: subject.to_owned(),
            documents: docs,
            owners,
        };
        let event = AuditEvent::new(
            format!("policy.{action}"),
            author,
            serde_json::json!({
                "revision": revision.revision,
                "subject": subject,
                "reason": reason,
                "documents": revision.documents.keys().collect::<Vec<_>>(),
                "diff": diff,
                "ca_server": self.authority.server_id(),
            }),
        );
        self.store.append_policy_revision(&revision, &event).await?;
        self.watch_effect(
            &format!("policy.{action}"),
            author,
            serde_json::json!({ "revision": revision.revision, "subject": subject }),
            vec![Awaited::Policy(revision.revision)],
        );
        if let Err(e) = self.refresh_policy().await {
            // Committed: the agents get it at their next sync or this server's next change.
            tracing::warn!(error = %e, "cannot reload the policy just applied");
        }
        tracing::info!(
            revision = revision.revision,
            action,
            subject,
            author,
            "policy changed"
        );
        Ok(PolicyChange {
            revision: revision.revision,
            changed,
            diff,
            dry_run,
        })
    }
}
