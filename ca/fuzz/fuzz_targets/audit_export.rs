//! An audit export (`meshid_ca::audit::export`) and the last-record scan of the file sink
//! (`meshid_ca::audit::sink`): whatever a file holds, they never panic, and an export that
//! verifies chains.
#![no_main]

use libfuzzer_sys::fuzz_target;
use meshid_ca::audit::export::verify_export;

fuzz_target!(|data: &[u8]| {
    if let Ok(summary) = verify_export(std::io::Cursor::new(data), None) {
        assert_eq!(summary.hashes.len() as u64, summary.records);
        assert!(summary
            .hashes
            .windows(2)
            .all(|w| w[1].0 == w[0].0 + 1));
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.jsonl");
    std::fs::write(&path, data).unwrap();
    let _ = meshid_ca::audit::sink::FileSink::open(&path);
});
