use super::*;
use crate::audit::checkpoint::CheckpointKey;
use crate::audit::AuditEvent;

fn records(n: i64) -> Vec<AuditRecord> {
    crate::audit::test_chain(n, 0)
}

fn export(records: &[AuditRecord], key: &CheckpointKey, every: usize) -> String {
    let mut out = String::new();
    for (i, r) in records.iter().enumerate() {
        out.push_str(&Line::Record(r.into()).to_json());
        out.push('\n');
        if (i + 1) % every == 0 {
            let c = key.sign("example.org", "ca-1", r.seq, &r.hash, r.time);
            out.push_str(&Line::Checkpoint(c).to_json());
            out.push('\n');
        }
    }
    out
}

fn key() -> (tempfile::TempDir, CheckpointKey) {
    let dir = tempfile::tempdir().unwrap();
    let k = CheckpointKey::load_or_create(&dir.path().join("k")).unwrap();
    (dir, k)
}

fn check(text: &str, pinned: Option<&[u8; 32]>) -> Result<ExportSummary, ExportError> {
    verify_export(std::io::Cursor::new(text.as_bytes()), pinned)
}

#[test]
fn an_intact_export_verifies() {
    let (_d, k) = key();
    let text = export(&records(10), &k, 3);
    let s = check(&text, Some(&k.public())).unwrap();
    assert_eq!(
        (s.records, s.first_seq, s.last_seq, s.checkpoints),
        (10, 1, 10, 3)
    );
    assert_eq!(s.last_checkpoint.map(|c| c.0), Some(9));
    assert_eq!(s.unsigned_tail, 1, "record 10 follows the last checkpoint");
    assert_eq!(s.trust_domain.as_deref(), Some("example.org"));
    assert_eq!(check("", None).unwrap().records, 0);
}

#[test]
fn checkpoints_of_two_trust_domains_do_not_mix() {
    let (_d, k) = key();
    let all = records(4);
    let mut text = export(&all, &k, 2);
    let c = k.sign("other.org", "ca-1", all[3].seq, &all[3].hash, all[3].time);
    text.push_str(&Line::Checkpoint(c).to_json());
    text.push('\n');
    let e = check(&text, Some(&k.public())).unwrap_err();
    assert!(e.to_string().contains("two trails mixed"), "{e}");
}

#[test]
fn an_export_may_start_mid_chain() {
    let (_d, k) = key();
    let all = records(10);
    let s = check(&export(&all[4..], &k, 2), None).unwrap();
    assert_eq!((s.first_seq, s.last_seq), (5, 10));
}

#[test]
fn removed_edited_or_reordered_lines_are_found() {
    let (_d, k) = key();
    let text = export(&records(6), &k, 2);
    let lines: Vec<&str> = text.lines().collect();
    let join = |ls: &[&str]| ls.iter().map(|l| format!("{l}\n")).collect::<String>();
    // A record removed.
    let mut removed = lines.clone();
    removed.remove(3);
    assert!(matches!(
        check(&join(&removed), None),
        Err(ExportError::Chain { .. } | ExportError::Checkpoint { .. })
    ));
    // A record edited.
    let edited = text.replacen("{\\\"n\\\":2}", "{\\\"n\\\":99}", 1);
    assert_ne!(edited, text);
    assert!(
        matches!(
            check(&edited, None),
            Err(ExportError::Chain { line: 2, .. })
        ),
        "{:?}",
        check(&edited, None)
    );
    // The tail cut, and a checkpoint that does not follow its record.
    assert!(matches!(
        check(&text[..text.len() - 5], None),
        Err(ExportError::Malformed { .. })
    ));
    let mut swapped = lines.clone();
    swapped.swap(2, 3);
    assert!(check(&join(&swapped), None).is_err());
}

#[test]
fn a_rewritten_and_rehashed_chain_fails_on_its_checkpoints() {
    // The attacker rewrites the records and recomputes every hash: the chain is consistent
    // again, but the checkpoints signed before no longer match, and new ones need the key.
    let (_d, k) = key();
    let all = records(6);
    let text = export(&all, &k, 3);
    let mut forged: Vec<AuditRecord> = Vec::new();
    for r in all.iter().filter(|r| r.seq != 2) {
        let (seq, hash) = forged.last().map_or((0, [0; 32]), |r| (r.seq, r.hash));
        let event = AuditEvent {
            kind: r.kind.clone(),
            actor: r.actor.clone(),
            details: serde_json::from_str(&r.details).unwrap(),
        };
        forged.push(AuditRecord::chain(&event, r.time, seq, hash));
    }
    let mut out = String::new();
    let checkpoints: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("\"checkpoint\""))
        .collect();
    for (i, r) in forged.iter().enumerate() {
        out.push_str(&Line::Record(r.into()).to_json());
        out.push('\n');
        if i == 2 {
            out.push_str(checkpoints[0]);
            out.push('\n');
        }
    }
    let e = check(&out, None).unwrap_err();
    assert!(matches!(e, ExportError::Checkpoint { seq: 3, .. }), "{e}");
    // A checkpoint signed with another key is refused when the key is pinned.
    let (_d2, other) = key();
    let resigned = export(&forged, &other, 3);
    assert!(check(&resigned, None).is_ok());
    assert!(matches!(
        check(&resigned, Some(&k.public())),
        Err(ExportError::Checkpoint { .. })
    ));
}

#[test]
fn a_fault_line_fails_the_export() {
    let (_d, k) = key();
    let mut text = export(&records(3), &k, 3);
    text.push_str(
        &Line::Fault(FaultLine {
            time: 1,
            server_id: "ca-1".into(),
            seq: 2,
            reason: "hash mismatch".into(),
        })
        .to_json(),
    );
    text.push('\n');
    assert!(matches!(
        check(&text, None),
        Err(ExportError::Fault { seq: 2, .. })
    ));
}

#[test]
fn malformed_lines_are_refused_with_their_number() {
    for bad in [
        "not json\n",
        "{\"type\":\"other\"}\n",
        "{\"type\":\"record\",\"seq\":1}\n",
        "[]\n",
    ] {
        assert!(
            matches!(
                check(bad, None),
                Err(ExportError::Malformed { line: 1, .. })
            ),
            "{bad}"
        );
    }
    let (_d, k) = key();
    let text = export(&records(1), &k, 1).replace("\"hash\":\"", "\"hash\":\"zz");
    assert!(matches!(
        check(&text, None),
        Err(ExportError::Malformed { line: 1, .. })
    ));
}

#[test]
fn the_cas_chain_is_compared_record_by_record() {
    let (_d, k) = key();
    let all = records(6);
    let s = check(&export(&all, &k, 2), None).unwrap();
    let ca: Vec<(i64, [u8; 32])> = all.iter().map(|r| (r.seq, r.hash)).collect();
    assert_eq!(compare_with_ca(&s, ca.clone(), 6), None);
    let mut longer = ca.clone();
    longer.push((7, [1; 32]));
    assert_eq!(
        compare_with_ca(&s, longer, 7),
        None,
        "the CA went on after the export"
    );
    // Truncated on the CA: the last 2 records are gone.
    assert_eq!(
        compare_with_ca(&s, ca[..4].to_vec(), 4),
        Some((5, AuditFault::HeadMismatch))
    );
    // Rewritten on the CA from seq 3.
    let mut rewritten = ca.clone();
    for r in &mut rewritten[2..] {
        r.1 = [9; 32];
    }
    assert_eq!(
        compare_with_ca(&s, rewritten, 6),
        Some((3, AuditFault::HashMismatch))
    );
    // A record removed and the rest renumbered would show as a mismatch; one removed without
    // renumbering as a gap.
    let mut gap = ca.clone();
    gap.remove(1);
    assert!(matches!(
        compare_with_ca(&s, gap, 6),
        Some((2, AuditFault::SeqGap { .. }))
    ));
}
