use super::*;
use crate::audit::AuditRecord;

fn records(n: i64, size: usize) -> Vec<AuditRecord> {
    crate::audit::test_chain(n, size)
}

fn lines(rs: &[AuditRecord]) -> Vec<Line> {
    rs.iter().map(|r| Line::Record(r.into())).collect()
}

#[test]
fn the_file_is_private_appended_and_resumed_after_its_last_record() {
    use std::os::unix::fs::PermissionsExt as _;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit/audit.jsonl");
    let (mut sink, cursor) = FileSink::open(&path).unwrap();
    assert_eq!(cursor, (0, [0; 32]));
    assert_eq!(
        std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
        0o600
    );
    // Records large enough that the scan back crosses several chunks.
    let rs = records(40, 10_000);
    sink.append(&lines(&rs)).unwrap();
    let k = crate::audit::checkpoint::CheckpointKey::load_or_create(&dir.path().join("k")).unwrap();
    let last = rs.last().unwrap();
    sink.append(&[Line::Checkpoint(
        k.sign("td", "ca-1", last.seq, &last.hash, 1),
    )])
    .unwrap();
    drop(sink);
    let (_, cursor) = FileSink::open(&path).unwrap();
    assert_eq!(cursor, (40, last.hash));
    let summary = crate::audit::export::verify_export(
        std::io::BufReader::new(std::fs::File::open(&path).unwrap()),
        None,
    )
    .unwrap();
    assert_eq!((summary.records, summary.checkpoints), (40, 1));
}

#[test]
fn a_cut_last_line_is_removed_and_garbage_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.jsonl");
    let rs = records(3, 10);
    let (mut sink, _) = FileSink::open(&path).unwrap();
    sink.append(&lines(&rs)).unwrap();
    drop(sink);
    let whole = std::fs::read(&path).unwrap();
    let mut cut = whole.clone();
    cut.extend_from_slice(b"{\"type\":\"record\",\"seq\":4,\"ti");
    std::fs::write(&path, &cut).unwrap();
    let (_, cursor) = FileSink::open(&path).unwrap();
    assert_eq!(cursor.0, 3);
    assert_eq!(
        std::fs::read(&path).unwrap(),
        whole,
        "only the cut line went"
    );
    // A file with only a cut line.
    std::fs::write(&path, b"{\"type\":").unwrap();
    assert_eq!(FileSink::open(&path).unwrap().1 .0, 0);
    assert_eq!(std::fs::read(&path).unwrap(), b"");
    // A complete line that is not an audit line: refused, nothing changed.
    let mut bad = whole.clone();
    bad.extend_from_slice(b"hello\n");
    std::fs::write(&path, &bad).unwrap();
    let e = FileSink::open(&path).unwrap_err().to_string();
    assert!(e.contains("not an audit line"), "{e}");
    assert_eq!(std::fs::read(&path).unwrap(), bad);
}

#[test]
fn syslog_messages_are_rfc5424_and_the_cursor_survives() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("log.sock");
    let rx = std::os::unix::net::UnixDatagram::bind(&sock).unwrap();
    rx.set_read_timeout(Some(std::time::Duration::from_secs(5)))
        .unwrap();
    let cursor_path = dir.path().join("syslog.cursor");
    let (mut sink, cursor) = SyslogSink::open(&sock, &cursor_path).unwrap();
    assert_eq!(cursor.0, 0);
    let mut rs = records(2, 10);
    rs.extend(records(3, MAX_SYSLOG_MESSAGE).into_iter().skip(2));
    let last = (rs[2].seq, rs[2].hash);
    sink.send(&lines(&rs), last).unwrap();
    let mut buf = vec![0; 256 * 1024];
    let n = rx.recv(&mut buf).unwrap();
    let msg = std::str::from_utf8(&buf[..n]).unwrap();
    assert!(msg.starts_with("<85>1 "), "{msg}");
    assert!(
        msg.contains(" meshid-ca ") && msg.contains(" audit - {\"type\":\"record\""),
        "{msg}"
    );
    rx.recv(&mut buf).unwrap();
    let n = rx.recv(&mut buf).unwrap();
    assert!(
        n <= MAX_SYSLOG_MESSAGE + 200,
        "an oversized record is cut: {n}"
    );
    assert!(std::str::from_utf8(&buf[..n])
        .unwrap()
        .contains("truncated"));
    let (_, cursor) = SyslogSink::open(&sock, &cursor_path).unwrap();
    assert_eq!(cursor, last);
    std::fs::write(&cursor_path, "x").unwrap();
    assert!(SyslogSink::open(&sock, &cursor_path).is_err());
    // Nobody listening: an error, to be retried.
    drop(rx);
    std::fs::remove_file(&sock).unwrap();
    std::fs::remove_file(&cursor_path).unwrap();
    let (mut sink, _) = SyslogSink::open(&sock, &cursor_path).unwrap();
    assert!(sink.send(&lines(&rs[..1]), (1, rs[0].hash)).is_err());
}
