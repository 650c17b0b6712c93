//! A backup's decrypted text (`meshid_ca::backup::check_plaintext`): whatever it holds, the
//! check never panics, and what passes has consistent counts.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok((header, counts)) = meshid_ca::backup::check_plaintext(std::io::Cursor::new(data.to_vec())) {
        assert_eq!(header.meshid_ca_backup, meshid_ca::backup::FORMAT);
        assert!(counts.rows == 0 || counts.tables > 0);
    }
});
