//! The tamper-evident audit log.
//!
//! Every issuance, admin change and token use becomes an [`AuditRecord`] whose hash covers the
//! previous record's hash, its own sequence number, time, kind, actor and details. The store
//! keeps the head (last seq and hash) apart from the records, so [`verify`] detects a record
//! that was edited, deleted (in the middle or at the end), inserted or reordered, and names the
//! first bad one.

use sha2::{Digest, Sha256};

/// The kinds of record another CA server acts on when it reads them from the shared log (the
/// change feed, `replay` in [`crate::server`]): a transaction that appends one of them
/// notifies the other servers at commit (PostgreSQL), so they read at once. Keep in step with
/// `replay` (a test checks).
pub const PEER_CHANGES: &[&str] = &[
    "entry.created",
    "entry.updated",
    "entry.rotated",
    "entry.deleted",
    "mesh.apply",
    "agent.rotated",
    "agent.evicted",
    "agent.banned",
    "ca.key.tainted",
    "ca.root.prepared",
    "ca.root.activated",
    "ca.root.retired",
    "svid.revoked",
    "ca.crl.signed",
    "policy.apply",
    "policy.delete",
    "policy.rollback",
];

/// Something that happened, before it is chained.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditEvent {
    /// Dotted event kind, e.g. `svid.x509.issued`, `entry.created`, `token.used`.
    pub kind: String,
    /// Who caused it, e.g. `admin:uid=0`, or an agent's SPIFFE ID.
    pub actor: String,
    /// Details as a JSON object. Never key material, token secrets or CSR bodies.
    pub details: serde_json::Value,
}

impl AuditEvent {
    /// A new event.
    pub fn new(
        kind: impl Into<String>,
        actor: impl Into<String>,
        details: serde_json::Value,
    ) -> Self {
        Self {
            kind: kind.into(),
            actor: actor.into(),
            details,
        }
    }
}

/// A chained audit record, as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditRecord {
    /// 1, 2, 3, ... with no gaps.
    pub seq: i64,
    /// Unix seconds.
    pub time: i64,
    /// Event kind.
    pub kind: String,
    /// Who caused it.
    pub actor: String,
    /// JSON text of the details (stored as text so the hash covers exactly what is stored).
    pub details: String,
    /// Hash of the previous record (all zero for seq 1).
    pub prev_hash: [u8; 32],
    /// This record's hash.
    pub hash: [u8; 32],
}

/// The hash of a record: SHA-256 over a length-prefixed encoding of every field but `hash`.
pub fn record_hash(
    seq: i64,
    time: i64,
    kind: &str,
    actor: &str,
    details: &str,
    prev_hash: &[u8; 32],
) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(b"meshid-audit-v1");
    h.update(prev_hash);
    h.update(seq.to_be_bytes());
    h.update(time.to_be_bytes());
    for field in [kind, actor, details] {
        h.update((field.len() as u64).to_be_bytes());
        h.update(field.as_bytes());
    }
    h.finalize().into()
}

impl AuditRecord {
    /// Chains `event` after `(prev_seq, prev_hash)` (use `(0, [0; 32])` for the first record).
    pub fn chain(event: &AuditEvent, time: i64, prev_seq: i64, prev_hash: [u8; 32]) -> Self {
        let seq = prev_seq + 1;
        let details = event.details.to_string();
        let hash = record_hash(seq, time, &event.kind, &event.actor, &details, &prev_hash);
        Self {
            seq,
            time,
            kind: event.kind.clone(),
            actor: event.actor.clone(),
            details,
            prev_hash,
            hash,
        }
    }
}

/// What is wrong with the audit log at a given sequence number.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum AuditFault {
    /// The record's stored hash does not match its contents: the record was edited.
    #[error("hash mismatch (record edited)")]
    HashMismatch,
    /// The record's `prev_hash` is not the previous record's hash: a record was deleted,
    /// inserted or reordered and the sequence numbers were rewritten to hide it.
    #[error("broken link to the previous record (record deleted, inserted or reordered)")]
    BrokenLink,
    /// The sequence numbers are not 1, 2, 3, ...: records were deleted or inserted.
    #[error("sequence gap: expected {expected}, found {found} (records deleted or inserted)")]
    SeqGap {
        /// The sequence number that should come next.
        expected: i64,
        /// The one found instead.
        found: i64,
    },
    /// The stored head does not point at the last record: the log was truncated, records were
    /// appended behind the writer's back, or the head was edited.
    #[error("the stored head does not match the last record (log truncated or head edited)")]
    HeadMismatch,
    /// There are records but no head, or a head but no records.
    #[error("records without a head, or a head without records (head or log deleted)")]
    MissingHead,
}

/// Why the audit log failed verification, and where: `seq` is the first sequence number at which
/// the log differs from what was written (for a gap or a truncation, the first missing one).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("audit record {seq}: {reason}")]
pub struct AuditViolation {
    /// The first bad sequence number.
    pub seq: i64,
    /// What is wrong there.
    pub reason: AuditFault,
}

/// Checks records one by one, in ascending order, keeping only the last one (so a log of any
/// size is verified page by page: [`crate::store::verify_audit`]).
#[derive(Debug, Default)]
pub struct ChainVerifier {
    /// Seq and hash of the last verified record.
    last: Option<(i64, [u8; 32])>,
    count: u64,
}

impl ChainVerifier {
    /// A verifier that continues a chain whose record `seq` has hash `hash` (an export that
    /// starts after the first record; `(0, [0; 32])` is the start).
    pub fn resume(seq: i64, hash: [u8; 32]) -> Self {
        Self {
            last: (seq > 0).then_some((seq, hash)),
            count: 0,
        }
    }

    /// The seq of the last record verified (0 before the first).
    pub fn last_seq(&self) -> i64 {
        self.last.map_or(0, |(seq, _)| seq)
    }

    /// Verifies the next record.
    pub fn push(&mut self, r: &AuditRecord) -> Result<(), AuditViolation> {
        let (prev_seq, prev_hash) = self.last.unwrap_or((0, [0; 32]));
        let expected = prev_seq + 1;
        let fail = |seq, reason| Err(AuditViolation { seq, reason });
        if r.seq != expected {
            return fail(
                expected.min(r.seq),
                AuditFault::SeqGap {
                    expected,
                    found: r.seq,
                },
            );
        }
        if r.prev_hash != prev_hash {
            return fail(r.seq, AuditFault::BrokenLink);
        }
        if record_hash(r.seq, r.time, &r.kind, &r.actor, &r.details, &r.prev_hash) != r.hash {
            return fail(r.seq, AuditFault::HashMismatch);
        }
        self.last = Some((r.seq, r.hash));
        self.count += 1;
        Ok(())
    }

    /// Compares the last record verified with the stored head; returns how many records were
    /// verified.
    pub fn finish(&self, head: Option<(i64, [u8; 32])>) -> Result<u64, AuditViolation> {
        let fail = |seq, reason| Err(AuditViolation { seq, reason });
        match (self.last, head) {
            (None, None) => Ok(0),
            (None, Some(_)) => fail(1, AuditFault::MissingHead),
            (Some((seq, _)), None) => fail(seq, AuditFault::MissingHead),
            (Some((seq, hash)), Some((head_seq, head_hash))) => {
                if seq == head_seq && hash == head_hash {
                    Ok(self.count)
                } else if head_seq > seq {
                    // Records after `seq` are missing.
                    fail(seq + 1, AuditFault::HeadMismatch)
                } else if head_seq < seq {
                    // Records after the head were added without moving it.
                    fail(head_seq + 1, AuditFault::HeadMismatch)
                } else {
                    fail(head_seq, AuditFault::HeadMismatch)
                }
            }
        }
    }
}

/// Verifies a whole audit log: `records` in ascending seq order, as stored, and the stored head.
/// Returns how many records were verified, or the first violation: an edited record, a deleted,
/// inserted or reordered one, a truncated log or an edited head.
pub fn verify(
    records: impl IntoIterator<Item = AuditRecord>,
    head: Option<(i64, [u8; 32])>,
) -> Result<u64, AuditViolation> {
    let mut verifier = ChainVerifier::default();
    for record in records {
        verifier.push(&record)?;
    }
    verifier.finish(head)
}

pub mod checkpoint;
pub mod export;
pub mod ship;
pub mod sink;
pub mod summary;

/// A chain of `n` records as the tests build them: `entry.created` by `admin:uid=0`, details
/// `{"n": i}` (with `"pad"`, `pad` bytes long, when `pad` is not 0), one second apart.
#[cfg(test)]
pub(crate) fn test_chain(n: i64, pad: usize) -> Vec<AuditRecord> {
    let mut out: Vec<AuditRecord> = Vec::new();
    for i in 1..=n {
        let (seq, hash) = out.last().map_or((0, [0; 32]), |r| (r.seq, r.hash));
        let details = if pad == 0 {
            serde_json::json!({ "n": i })
        } else {
            serde_json::json!({ "n": i, "pad": "p".repeat(pad) })
        };
        let event = AuditEvent::new("entry.created", "admin:uid=0", details);
        out.push(AuditRecord::chain(&event, 1_700_000_000 + i, seq, hash));
    }
    out
}

#[cfg(test)]
mod tests {
    /// Every kind the change feed replays notifies the other servers.
    #[test]
    fn every_replayed_kind_notifies_the_peers() {
        let source = include_str!("server.rs");
        let start = source.find("async fn replay(").unwrap();
        let end = start + source[start..].find("\n}\n").unwrap();
        let body = &source[start..end];
        let mut kinds = Vec::new();
        for part in body.split('"').skip(1).step_by(2) {
            if part.contains('.') && !part.contains(' ') {
                kinds.push(part);
            }
        }
        assert!(kinds.len() >= 10, "{kinds:?}");
        for kind in kinds {
            assert!(
                super::PEER_CHANGES.contains(&kind),
                "{kind} is replayed but not in PEER_CHANGES"
            );
        }
    }

    use super::*;

    fn log(n: i64) -> Vec<AuditRecord> {
        super::test_chain(n, 0)
    }

    fn head(records: &[AuditRecord]) -> Option<(i64, [u8; 32])> {
        records.last().map(|r| (r.seq, r.hash))
    }

    fn violation(seq: i64, reason: AuditFault) -> Result<u64, AuditViolation> {
        Err(AuditViolation { seq, reason })
    }

    #[test]
    fn intact_logs_verify() {
        assert_eq!(verify(Vec::new(), None), Ok(0));
        let records = log(5);
        let h = head(&records);
        assert_eq!(verify(records, h), Ok(5));
    }

    #[test]
    fn edited_record_is_a_hash_mismatch() {
        let mut records = log(5);
        let h = head(&records);
        records[2].details = r#"{"n":99}"#.to_owned();
        assert_eq!(verify(records, h), violation(3, AuditFault::HashMismatch));
    }

    #[test]
    fn edited_time_kind_or_actor_is_a_hash_mismatch() {
        for edit in [
            (|r: &mut AuditRecord| r.time += 1) as fn(&mut AuditRecord),
            |r| r.kind = "entry.deleted".to_owned(),
            |r| r.actor = "admin:uid=1000".to_owned(),
        ] {
            let mut records = log(3);
            let h = head(&records);
            edit(&mut records[1]);
            assert_eq!(verify(records, h), violation(2, AuditFault::HashMismatch));
        }
    }

    #[test]
    fn deleted_middle_record_is_a_gap() {
        let mut records = log(5);
        let h = head(&records);
        records.remove(2);
        assert_eq!(
            verify(records, h),
            violation(
                3,
                AuditFault::SeqGap {
                    expected: 3,
                    found: 4
                }
            )
        );
    }

    #[test]
    fn deleted_record_with_renumbering_is_a_broken_link() {
        let mut records = log(5);
        records.remove(2);
        for r in &mut records[2..] {
            r.seq -= 1;
        }
        let h = head(&records);
        assert_eq!(verify(records, h), violation(3, AuditFault::BrokenLink));
    }

    #[test]
    fn reordered_records_are_a_broken_link() {
        let mut records = log(5);
        let h = head(&records);
        records.swap(1, 3);
        let (a, b) = (records[1].seq, records[3].seq);
        records[1].seq = b;
        records[3].seq = a;
        assert_eq!(verify(records, h), violation(2, AuditFault::BrokenLink));
    }

    #[test]
    fn rehashed_edit_is_caught_by_the_next_link() {
        // An attacker who edits a record and recomputes its hash breaks the next record's link.
        let mut records = log(4);
        let h = head(&records);
        let r = &mut records[1];
        r.details = r#"{"n":42}"#.to_owned();
        r.hash = record_hash(r.seq, r.time, &r.kind, &r.actor, &r.details, &r.prev_hash);
        assert_eq!(verify(records, h), violation(3, AuditFault::BrokenLink));
    }

    #[test]
    fn truncation_is_a_head_mismatch() {
        let mut records = log(5);
        let h = head(&records);
        records.truncate(3);
        assert_eq!(verify(records, h), violation(4, AuditFault::HeadMismatch));
    }

    #[test]
    fn appended_record_without_head_is_a_head_mismatch() {
        let records = log(5);
        let h = head(&records[..4]);
        assert_eq!(verify(records, h), violation(5, AuditFault::HeadMismatch));
    }

    #[test]
    fn edited_head_is_a_head_mismatch() {
        let records = log(5);
        let (seq, mut hash) = head(&records).unwrap();
        hash[0] ^= 1;
        assert_eq!(
            verify(records, Some((seq, hash))),
            violation(5, AuditFault::HeadMismatch)
        );
    }

    #[test]
    fn missing_head_or_missing_records() {
        let records = log(3);
        let h = head(&records);
        assert_eq!(verify(records, None), violation(3, AuditFault::MissingHead));
        assert_eq!(verify(Vec::new(), h), violation(1, AuditFault::MissingHead));
    }

    #[test]
    fn first_record_must_be_seq_one_with_zero_prev_hash() {
        let records = log(3);
        let h = head(&records);
        assert_eq!(
            verify(records[1..].to_vec(), h),
            violation(
                1,
                AuditFault::SeqGap {
                    expected: 1,
                    found: 2
                }
            )
        );
    }

    #[test]
    fn violation_display_names_the_record() {
        let v = AuditViolation {
            seq: 17,
            reason: AuditFault::HashMismatch,
        };
        assert_eq!(
            v.to_string(),
            "audit record 17: hash mismatch (record edited)"
        );
    }
}
