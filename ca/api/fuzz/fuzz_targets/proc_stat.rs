//! The start time in a `/proc/<pid>/stat` line (`meshid_api::uds::admission::parse_start_time`),
//! whose second field is a command name any process chooses (spaces and parentheses
//! included): no panic on any text, and for a line built around any command name the 22nd
//! field is found.
#![no_main]

use libfuzzer_sys::fuzz_target;
use meshid_api::uds::admission::parse_start_time;

fuzz_target!(|data: (&str, u64)| {
    let (comm, start) = data;
    let _ = parse_start_time(comm);
    // A line as the kernel writes it: pid, (comm), then fields 3 to 22 and more.
    let line = format!(
        "4242 ({comm}) S 1 4242 4242 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 {start} 1 2 3"
    );
    assert_eq!(parse_start_time(&line), Some(start), "{line:?}");
});
