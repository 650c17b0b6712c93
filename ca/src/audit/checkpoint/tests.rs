use super::*;

fn key(dir: &Path) -> CheckpointKey {
    CheckpointKey::load_or_create(&dir.join("keys/audit-checkpoint.key")).unwrap()
}

#[test]
fn a_key_is_made_once_private_and_its_public_half_is_readable_by_openssl_and_us() {
    use std::os::unix::fs::PermissionsExt as _;
    let dir = tempfile::tempdir().unwrap();
    let a = key(dir.path());
    let b = key(dir.path());
    assert_eq!(a.public(), b.public(), "the key is loaded, not made again");
    let path = dir.path().join("keys/audit-checkpoint.key");
    let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let pub_pem = std::fs::read(public_key_path(&path)).unwrap();
    assert_eq!(parse_public_key_pem(&pub_pem).unwrap(), a.public());
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o640)).unwrap();
    let e = CheckpointKey::load_or_create(&path)
        .unwrap_err()
        .to_string();
    assert!(e.contains("chmod 600"), "{e}");
}

#[test]
fn a_checkpoint_verifies_and_any_change_breaks_it() {
    let dir = tempfile::tempdir().unwrap();
    let k = key(dir.path());
    let c = k.sign("example.org", "ca-1", 42, &[7; 32], 1_700_000_000);
    assert_eq!(c.verify(None), Ok(k.public()));
    assert_eq!(c.verify(Some(&k.public())), Ok(k.public()));
    let other = key(&dir.path().join("other"));
    assert!(matches!(
        c.verify(Some(&other.public())),
        Err(CheckpointError::WrongKey { .. })
    ));
    for edit in [
        (|c: &mut Checkpoint| c.seq += 1) as fn(&mut Checkpoint),
        |c| c.time += 1,
        |c| c.hash = hex::encode([8; 32]),
        |c| c.server_id = "ca-2".into(),
        |c| c.trust_domain = "example.com".into(),
    ] {
        let mut bad = c.clone();
        edit(&mut bad);
        assert_eq!(bad.verify(None), Err(CheckpointError::BadSignature));
    }
    // Another key's checkpoint passed off under this key's name.
    let mut forged = other.sign("example.org", "ca-1", 42, &[7; 32], 1_700_000_000);
    forged.key_id = c.key_id.clone();
    assert_eq!(
        forged.verify(None),
        Err(CheckpointError::Malformed("key_id"))
    );
    let mut bad = c.clone();
    bad.signature = "!!".into();
    assert_eq!(
        bad.verify(None),
        Err(CheckpointError::Malformed("signature"))
    );
}

#[test]
fn the_public_key_pem_is_what_openssl_reads() {
    let dir = tempfile::tempdir().unwrap();
    let k = key(dir.path());
    let path = public_key_path(&dir.path().join("keys/audit-checkpoint.key"));
    let Ok(out) = std::process::Command::new("openssl")
        .args(["pkey", "-pubin", "-noout", "-text", "-in"])
        .arg(&path)
        .output()
    else {
        println!("SKIPPED: no openssl");
        return;
    };
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && text.contains("ED25519"), "{text}");
    assert!(
        parse_public_key_pem(b"-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n")
            .is_err()
    );
    let _ = k;
}
