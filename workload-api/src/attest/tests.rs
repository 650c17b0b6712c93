use std::os::unix::fs::MetadataExt;
use std::process::{Command, Stdio};

use super::*;
use meshid_api::uds::admission::parse_start_time;

/// The effective uid and gid of this process (`/proc/self` is owned by them).
fn own_ids() -> (u32, u32) {
    let meta = std::fs::metadata("/proc/self").unwrap();
    (meta.uid(), meta.gid())
}

fn own_pid() -> i32 {
    i32::try_from(std::process::id()).unwrap()
}

fn sha256_hex(path: &Path) -> String {
    let bytes = std::fs::read(path).unwrap();
    hex::encode(aws_lc_rs::digest::digest(
        &aws_lc_rs::digest::SHA256,
        &bytes,
    ))
}

#[test]
fn start_time_is_field_22_even_with_parens_in_comm() {
    let tail = (3..=30)
        .map(|i| i.to_string())
        .collect::<Vec<_>>()
        .join(" ");
    let stat = format!("1234 (a) (b c) d)) {tail}\n");
    assert_eq!(parse_start_time(&stat), Some(22));
    assert!(parse_start_time("1234 (x) S 1 2").is_none());
    assert!(parse_start_time("no parens at all").is_none());
}

#[test]
fn status_gives_euid_and_groups() {
    let status = "Name:\tx\nUid:\t1000\t1001\t1000\t1000\nGid:\t5\t5\t5\t5\nGroups:\t4 24 27 \n";
    assert_eq!(
        parse_status(status),
        Ok(Status {
            euid: 1001,
            groups: vec![4, 24, 27]
        })
    );
    assert_eq!(
        parse_status("Uid:\t0\t0\t0\t0\nGroups:\n").map(|s| s.groups),
        Ok(vec![])
    );
    assert!(parse_status("Groups: 1\n").is_err());
    assert!(parse_status("Uid: 0 0 0 0\nGroups: a\n").is_err());
}

#[test]
fn names_come_from_the_first_matching_line() {
    let db = "# comment\nroot:x:0:0:root:/root:/bin/sh\n:x:7:7\nweb:x:33:33::/:/bin/false\nwww:x:33:33\n";
    assert_eq!(find_name(db, 0), Some("root"));
    assert_eq!(find_name(db, 33), Some("web"));
    assert_eq!(find_name(db, 7), None);
    assert_eq!(find_name(db, 99), None);
}

#[tokio::test]
async fn own_process_has_uid_gid_path_and_hash_selectors() {
    let (uid, gid) = own_ids();
    let attestor = Attestor::new();
    let selectors = attestor.attest(own_pid(), uid, gid).await.unwrap();

    let exe = std::env::current_exe().unwrap();
    let mut sorted = selectors.clone();
    sorted.sort();
    assert_eq!(selectors, sorted, "selectors are sorted");
    for expected in [
        format!("unix:uid:{uid}"),
        format!("unix:gid:{gid}"),
        format!("unix:path:{}", exe.display()),
        format!("unix:sha256:{}", sha256_hex(&exe)),
    ] {
        assert!(selectors.contains(&expected), "{expected} in {selectors:?}");
    }
    if uid == 0 {
        assert!(selectors.contains(&"unix:user:root".to_owned()));
    }
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    for g in parse_status(&status).unwrap().groups {
        assert!(selectors.contains(&format!("unix:supplementary_gid:{g}")));
    }

    // A second attestation is served from the hash cache and gives the same answer.
    assert_eq!(attestor.inner.cache().len(), 1);
    assert_eq!(
        attestor.attest(own_pid(), uid, gid).await.unwrap(),
        selectors
    );
    assert_eq!(attestor.inner.cache().len(), 1);
}

#[tokio::test]
async fn size_cap_drops_only_the_hash() {
    let (uid, gid) = own_ids();
    let selectors = Attestor::new()
        .with_max_binary_size(1)
        .attest(own_pid(), uid, gid)
        .await
        .unwrap();
    assert!(selectors.iter().any(|s| s.starts_with("unix:path:")));
    assert!(!selectors.iter().any(|s| s.starts_with("unix:sha256:")));
}

#[tokio::test]
async fn wrong_uid_is_refused() {
    let (uid, gid) = own_ids();
    let err = Attestor::new()
        .attest(own_pid(), uid.wrapping_add(1), gid)
        .await
        .unwrap_err();
    assert!(matches!(err, AttestError::ProcessChanged { .. }), "{err}");
}

#[tokio::test]
async fn exited_process_is_refused() {
    let (uid, gid) = own_ids();
    let mut child = Command::new("true").spawn().unwrap();
    let pid = i32::try_from(child.id()).unwrap();
    child.wait().unwrap();
    let err = Attestor::new().attest(pid, uid, gid).await.unwrap_err();
    assert!(matches!(err, AttestError::ProcessChanged { .. }), "{err}");
    assert!(matches!(
        Attestor::new().attest(0, uid, gid).await,
        Err(AttestError::InvalidPid(0))
    ));
}

/// Kills the child when the test ends, however it ends.
struct Reap(std::process::Child);

impl Drop for Reap {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test]
async fn deleted_binary_has_no_path_or_hash() {
    let (uid, gid) = own_ids();
    let dir = tempfile::tempdir().unwrap();
    let copy = dir.path().join("sleeper");
    std::fs::copy("/bin/sleep", &copy).unwrap();
    // Another test thread forking while the copy was open for writing can make exec fail
    // with ETXTBSY for a moment.
    let mut attempts = 0;
    let child = loop {
        match Command::new(&copy).arg("30").stdin(Stdio::null()).spawn() {
            Ok(c) => break Reap(c),
            Err(e) if e.raw_os_error() == Some(26) && attempts < 50 => {
                attempts += 1;
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            Err(e) => panic!("spawn {}: {e}", copy.display()),
        }
    };
    let pid = i32::try_from(child.0.id()).unwrap();

    let attestor = Attestor::new();
    let before = attestor.attest(pid, uid, gid).await.unwrap();
    assert!(
        before.contains(&format!("unix:path:{}", copy.display())),
        "{before:?}"
    );
    assert!(before.contains(&format!("unix:sha256:{}", sha256_hex(&copy))));

    std::fs::remove_file(&copy).unwrap();
    let after = attestor.attest(pid, uid, gid).await.unwrap();
    assert!(
        !after
            .iter()
            .any(|s| s.starts_with("unix:path:") || s.starts_with("unix:sha256:")),
        "{after:?}"
    );
    assert!(after.contains(&format!("unix:uid:{uid}")));
}

#[tokio::test]
async fn other_user_is_named() {
    use std::os::unix::process::CommandExt;
    if own_ids().0 != 0 {
        eprintln!("skipped: needs root to start a process as another user");
        return;
    }
    let passwd = std::fs::read_to_string("/etc/passwd").unwrap_or_default();
    let Some(nobody) = find_name(&passwd, 65534).map(str::to_owned) else {
        eprintln!("skipped: no user 65534");
        return;
    };
    let child = Reap(
        Command::new("sleep")
            .arg("30")
            .uid(65534)
            .gid(65534)
            .stdin(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let pid = i32::try_from(child.0.id()).unwrap();
    let selectors = Attestor::new().attest(pid, 65534, 65534).await.unwrap();
    assert!(
        selectors.contains(&format!("unix:user:{nobody}")),
        "{selectors:?}"
    );
    assert!(selectors.iter().any(|s| s.starts_with("unix:path:/")));
}

#[test]
fn account_names_are_cached_until_the_file_changes() {
    let dir = tempfile::tempdir().unwrap();
    let passwd = dir.path().join("passwd");
    std::fs::write(&passwd, "alice:x:1000:1000::/home/alice:/bin/sh\n").unwrap();
    let a = Attestor::with_paths(
        "/proc",
        &passwd,
        dir.path().join("group"),
        DEFAULT_MAX_BINARY_SIZE,
    );
    assert_eq!(a.inner.lookup_name(&passwd, 1000).as_deref(), Some("alice"));
    assert_eq!(a.inner.lookup_name(&passwd, 1001), None);
    // A changed file (new size and mtime) is read again.
    std::thread::sleep(std::time::Duration::from_millis(20));
    std::fs::write(
        &passwd,
        "bob:x:1000:1000::/home/bob:/bin/sh\nc:x:1001:1::/:/bin/sh\n",
    )
    .unwrap();
    assert_eq!(a.inner.lookup_name(&passwd, 1000).as_deref(), Some("bob"));
    assert_eq!(a.inner.lookup_name(&passwd, 1001).as_deref(), Some("c"));
    assert_eq!(
        a.inner.lookup_name(&dir.path().join("group"), 1),
        None,
        "missing file: no name"
    );
}
