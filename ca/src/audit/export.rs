//! The audit trail as shipped to a sink and exported: JSON lines, one per record, signed
//! checkpoint or fault, and how an export is checked on its own (no CA needed).
//!
//! A record line carries everything its hash covers, so a reader recomputes the chain. A
//! checkpoint line ([`super::checkpoint::Checkpoint`]) signs the head as shipped. A fault line
//! says the shipper found the datastore's chain no longer extends what it had shipped (records
//! rewritten, removed or re-hashed): the export is evidence, and verifying it fails.

use serde::{Deserialize, Serialize};

use super::checkpoint::{Checkpoint, CheckpointError};
use super::{AuditFault, AuditRecord, AuditViolation, ChainVerifier};

/// The longest line read from an export (a record's details are bounded well below this).
pub const MAX_LINE: usize = 64 << 20;

/// One line of an export.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Line {
    /// An audit record.
    Record(RecordLine),
    /// A signed head.
    Checkpoint(Checkpoint),
    /// The shipper found the datastore's chain rewritten under what it had shipped.
    Fault(FaultLine),
}

/// An audit record as a line.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RecordLine {
    /// Sequence number.
    pub seq: i64,
    /// Unix seconds.
    pub time: i64,
    /// Event kind.
    pub kind: String,
    /// Who caused it.
    pub actor: String,
    /// The details' JSON text, exactly as hashed.
    pub details: String,
    /// The previous record's hash, hex.
    pub prev_hash: String,
    /// This record's hash, hex.
    pub hash: String,
}

/// A detected rewrite, as a line.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FaultLine {
    /// Unix seconds when it was detected.
    pub time: i64,
    /// The CA server whose shipper detected it.
    pub server_id: String,
    /// The first sequence number whose record differs from what was shipped.
    pub seq: i64,
    /// What was found.
    pub reason: String,
}

impl From<&AuditRecord> for RecordLine {
    fn from(r: &AuditRecord) -> Self {
        Self {
            seq: r.seq,
            time: r.time,
            kind: r.kind.clone(),
            actor: r.actor.clone(),
            details: r.details.clone(),
            prev_hash: hex::encode(r.prev_hash),
            hash: hex::encode(r.hash),
        }
    }
}

impl RecordLine {
    /// The record, with its hashes decoded.
    pub fn record(&self) -> Option<AuditRecord> {
        let decode = |h: &str| hex::decode(h).ok()?.try_into().ok();
        Some(AuditRecord {
            seq: self.seq,
            time: self.time,
            kind: self.kind.clone(),
            actor: self.actor.clone(),
            details: self.details.clone(),
            prev_hash: decode(&self.prev_hash)?,
            hash: decode(&self.hash)?,
        })
    }
}

impl Line {
    /// The line's JSON text, without the newline.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }
}

/// Why an export does not verify.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ExportError {
    /// A line is not valid.
    #[error("line {line}: {reason}")]
    Malformed {
        /// 1-based line number.
        line: usize,
        /// What is wrong.
        reason: String,
    },
    /// The records do not chain.
    #[error("line {line}: {violation}")]
    Chain {
        /// 1-based line number.
        line: usize,
        /// The first bad record.
        violation: AuditViolation,
    },
    /// A checkpoint does not verify or does not match the records before it.
    #[error("line {line}: checkpoint at seq {seq}: {reason}")]
    Checkpoint {
        /// 1-based line number.
        line: usize,
        /// Its sequence number.
        seq: i64,
        /// What is wrong.
        reason: String,
    },
    /// The shipper recorded a rewrite of the datastore's chain.
    #[error("line {line}: the CA server {server_id} found the datastore's audit chain rewritten at seq {seq}: {reason}")]
    Fault {
        /// 1-based line number.
        line: usize,
        /// The server.
        server_id: String,
        /// Where.
        seq: i64,
        /// What.
        reason: String,
    },
    /// Reading failed.
    #[error("cannot read the export: {0}")]
    Io(String),
}

/// What a verified export holds.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ExportSummary {
    /// Record lines.
    pub records: u64,
    /// The first record's sequence number (0: none). An export may start after 1 (a sink
    /// enabled on an existing log starts at the head, a rotated file after the last one).
    pub first_seq: i64,
    /// The last record's sequence number.
    pub last_seq: i64,
    /// Checkpoint lines.
    pub checkpoints: u64,
    /// The last checkpoint: (seq, time).
    pub last_checkpoint: Option<(i64, i64)>,
    /// The records after the last checkpoint (not signed yet: a checkpoint follows each
    /// interval).
    pub unsigned_tail: u64,
    /// The trust domain the checkpoints name (all the same).
    pub trust_domain: Option<String>,
    /// The keys that signed checkpoints, by [`super::checkpoint::key_id`].
    pub key_ids: std::collections::BTreeSet<String>,
    /// Every record's (seq, hash), to compare with the CA's own chain.
    pub hashes: Vec<(i64, [u8; 32])>,
}

/// Checks an export on its own: each line is valid; the records chain (each hash recomputed,
/// each linked to the one before, no gaps); each checkpoint's signature verifies, with `pinned`
/// when given, and names the record just before it; no fault was recorded.
pub fn verify_export(
    mut input: impl std::io::BufRead,
    pinned: Option<&[u8; 32]>,
) -> Result<ExportSummary, ExportError> {
    let mut summary = ExportSummary::default();
    let mut chain: Option<ChainVerifier> = None;
    let mut buf = Vec::new();
    let mut n = 0;
    loop {
        buf.clear();
        let read = read_line(&mut input, &mut buf).map_err(|e| ExportError::Io(e.to_string()))?;
        if read == 0 {
            break;
        }
        n += 1;
        let malformed = |reason: String| ExportError::Malformed { line: n, reason };
        if buf.last() != Some(&b'\n') {
            return Err(malformed(
                "the last line is incomplete (no newline): the file was cut".to_owned(),
            ));
        }
        let line: Line = serde_json::from_slice(&buf[..buf.len() - 1])
            .map_err(|e| malformed(format!("not an audit line ({e})")))?;
        match line {
            Line::Record(r) => {
                let record = r
                    .record()
                    .ok_or_else(|| malformed("a hash is not 32 bytes of hex".to_owned()))?;
                let verifier = chain.get_or_insert_with(|| {
                    summary.first_seq = record.seq;
                    ChainVerifier::resume(record.seq - 1, record.prev_hash)
                });
                verifier
                    .push(&record)
                    .map_err(|violation| ExportError::Chain { line: n, violation })?;
                summary.records += 1;
                summary.unsigned_tail += 1;
                summary.last_seq = record.seq;
                summary.hashes.push((record.seq, record.hash));
            }
            Line::Checkpoint(c) => {
                let bad = |reason: String| ExportError::Checkpoint {
                    line: n,
                    seq: c.seq,
                    reason,
                };
                let public = c
                    .verify(pinned)
                    .map_err(|e: CheckpointError| bad(e.to_string()))?;
                let hash = c.hash_bytes().map_err(|e| bad(e.to_string()))?;
                match &summary.trust_domain {
                    Some(td) if *td != c.trust_domain => {
                        return Err(bad(format!(
                            "it is for trust domain {:?}, the ones before it for {td:?} (two trails mixed)",
                            c.trust_domain
                        )))
                    }
                    Some(_) => {}
                    None => summary.trust_domain = Some(c.trust_domain.clone()),
                }
                match summary.hashes.last() {
                    Some(&(seq, h)) if seq == c.seq && h == hash => {}
                    Some(&(seq, _)) if seq == c.seq => {
                        return Err(bad("its hash is not the record's".to_owned()))
                    }
                    _ => {
                        return Err(bad(format!(
                            "it does not follow record {} (the records before it were removed or reordered)",
                            c.seq
                        )))
                    }
                }
                summary.checkpoints += 1;
                summary.unsigned_tail = 0;
                summary.last_checkpoint = Some((c.seq, c.time));
                summary.key_ids.insert(super::checkpoint::key_id(&public));
            }
            Line::Fault(f) => {
                return Err(ExportError::Fault {
                    line: n,
                    server_id: f.server_id,
                    seq: f.seq,
                    reason: f.reason,
                })
            }
        }
    }
    Ok(summary)
}

/// Reads one line (up to and including `\n`) into `buf`, refusing lines over [`MAX_LINE`].
fn read_line(input: &mut impl std::io::BufRead, buf: &mut Vec<u8>) -> std::io::Result<usize> {
    use std::io::{BufRead as _, Read as _};
    let n = input.take(MAX_LINE as u64 + 1).read_until(b'\n', buf)?;
    if n > MAX_LINE {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("a line is longer than {MAX_LINE} bytes"),
        ));
    }
    Ok(n)
}

/// Where the CA's own chain departs from an export's records: the first (seq, what) found, or
/// `None` when every exported record is in the CA's chain unchanged. `ca` yields the CA's
/// (seq, hash) in ascending order, from at most the export's first seq; `ca_head` is the
/// CA's last seq.
pub fn compare_with_ca(
    export: &ExportSummary,
    ca: impl IntoIterator<Item = (i64, [u8; 32])>,
    ca_head: i64,
) -> Option<(i64, AuditFault)> {
    let mut ca = ca.into_iter().peekable();
    for &(seq, hash) in &export.hashes {
        while ca.peek().is_some_and(|&(s, _)| s < seq) {
            ca.next();
        }
        match ca.peek() {
            Some(&(s, h)) if s == seq => {
                if h != hash {
                    return Some((seq, AuditFault::HashMismatch));
                }
            }
            Some(&(s, _)) => {
                return Some((
                    seq,
                    AuditFault::SeqGap {
                        expected: seq,
                        found: s,
                    },
                ))
            }
            None => return Some((seq.min(ca_head + 1), AuditFault::HeadMismatch)),
        }
    }
    None
}

#[cfg(test)]
mod tests;
