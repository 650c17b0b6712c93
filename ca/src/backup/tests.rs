use super::*;
use crate::audit::AuditEvent;

fn pass(p: &str) -> SecretString {
    SecretString::from(p.to_owned())
}

async fn source(dir: &Path) -> (SqlStore, PathBuf) {
    crate::authority::ensure_private_dir(dir).unwrap();
    let store = SqlStore::open_sqlite_in(dir).await.unwrap();
    for i in 0..5 {
        store
            .append_audit(&AuditEvent::new("test", "t", serde_json::json!({ "i": i })))
            .await
            .unwrap();
    }
    let keys = dir.join("keys");
    crate::authority::ensure_private_dir(&keys).unwrap();
    meshid_api::files::write_private(
        &keys.join("root-1.key"),
        b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
    )
    .unwrap();
    (store, keys)
}

async fn make(dir: &Path, protection: Protection) -> PathBuf {
    let (store, keys) = source(&dir.join("src")).await;
    let h = header(&store, "example.org", "ca-1").await.unwrap();
    let out = dir.join("b.age");
    backup(&store, &keys, h, &out, protection).await.unwrap();
    out
}

#[tokio::test]
async fn a_passphrase_backup_restores_and_a_wrong_one_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let file = make(dir.path(), Protection::Passphrase(pass("right"))).await;
    let dst = dir.path().join("dst");
    let target = |td| Target {
        datastore: "",
        data_dir: &dst,
        trust_domain: td,
    };
    let url = format!("sqlite://{}", dst.join("meshid-ca.db").display());
    let e = restore(
        &file,
        &Unlock::Passphrase(pass("wrong")),
        Target {
            datastore: &url,
            ..target("example.org")
        },
    )
    .await
    .unwrap_err();
    assert!(matches!(e, BackupError::Decrypt(_)), "{e}");
    assert!(!dst.exists());
    let e = restore(
        &file,
        &Unlock::Passphrase(pass("right")),
        Target {
            datastore: &url,
            ..target("example.com")
        },
    )
    .await
    .unwrap_err();
    assert!(matches!(e, BackupError::Refused(_)), "{e}");
    assert!(!dst.exists());
    let (h, c) = restore(
        &file,
        &Unlock::Passphrase(pass("right")),
        Target {
            datastore: &url,
            ..target("example.org")
        },
    )
    .await
    .unwrap();
    assert_eq!((h.server_id.as_str(), c.keys), ("ca-1", 1));
    assert!(std::fs::read_to_string(dst.join("keys/root-1.key"))
        .unwrap()
        .contains("PRIVATE KEY"));
    let store = SqlStore::open(&url).await.unwrap();
    crate::store::verify_audit(&store).await.unwrap();
    assert_eq!(store.audit_head().await.unwrap().unwrap().0, 5);
    // Not over a data directory that has keys.
    let e = restore(
        &file,
        &Unlock::Passphrase(pass("right")),
        Target {
            datastore: &url,
            ..target("example.org")
        },
    )
    .await
    .unwrap_err();
    assert!(e.to_string().contains("not empty"), "{e}");
}

#[tokio::test]
async fn recipients_decrypt_with_their_identity_file_only() {
    let dir = tempfile::tempdir().unwrap();
    let id = age::x25519::Identity::generate();
    let other = age::x25519::Identity::generate();
    let file = make(dir.path(), Protection::Recipients(vec![id.to_public()])).await;
    let id_file = dir.path().join("id.txt");
    use age::secrecy::ExposeSecret as _;
    meshid_api::files::write_private(&id_file, id.to_string().expose_secret().as_bytes()).unwrap();
    let ids = identity_file(&id_file).unwrap();
    assert_eq!(inspect(&file, &Unlock::Identities(ids)).unwrap().1.keys, 1);
    let e = inspect(&file, &Unlock::Identities(vec![Box::new(other)])).unwrap_err();
    assert!(matches!(e, BackupError::Decrypt(_)));
    // An identity file others may read is refused.
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(&id_file, std::fs::Permissions::from_mode(0o644)).unwrap();
    assert!(identity_file(&id_file).is_err());
}

#[tokio::test]
async fn a_cut_or_altered_backup_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let file = make(dir.path(), Protection::Passphrase(pass("p"))).await;
    let whole = std::fs::read(&file).unwrap();
    let unlock = Unlock::Passphrase(pass("p"));
    let cut = dir.path().join("cut");
    std::fs::write(&cut, &whole[..whole.len() - 20]).unwrap();
    assert!(inspect(&cut, &unlock).is_err());
    let mut flipped = whole.clone();
    let at = flipped.len() - 40;
    flipped[at] ^= 1;
    std::fs::write(&cut, &flipped).unwrap();
    assert!(inspect(&cut, &unlock).is_err());
    std::fs::write(&cut, b"not an age file").unwrap();
    assert!(matches!(
        inspect(&cut, &unlock),
        Err(BackupError::Decrypt(_))
    ));
}

#[test]
fn malformed_plaintext_is_refused_with_a_reason() {
    let header = r#"{"header":{"meshid_ca_backup":1,"created_at":1,"trust_domain":"example.org","server_id":"ca-1","backend":"sqlite","schema_version":10}}"#;
    let table = r#"{"dump":{"table":{"name":"agents","columns":["a"]}}}"#;
    let row = r#"{"dump":{"row":[{"i":1}]}}"#;
    let key = r#"{"key":{"name":"k.key","contents":"x"}}"#;
    let end = |t, r, k| format!(r#"{{"end":{{"tables":{t},"rows":{r},"keys":{k}}}}}"#);
    let check = |lines: &[&str]| {
        let text: String = lines.iter().map(|l| format!("{l}\n")).collect();
        check_plaintext(std::io::Cursor::new(text.into_bytes()))
    };
    let good_end = end(1, 1, 1);
    assert!(check(&[header, table, row, key, &good_end]).is_ok());
    for (bad, why) in [
        (vec![table, row, key, good_end.as_str()], "no header"),
        (vec![header, table, row, key], "cut short"),
        (vec![header, table, row, key, &end(1, 2, 1)], "holds"),
        (vec![header, row, table, key, &good_end], "out of place"),
        (vec![header, table, key, row, &good_end], "out of place"),
        (
            vec![header, table, row, key, &good_end, row],
            "after the end",
        ),
        (vec![header, "{", &good_end], "line 2"),
        (
            vec![
                header,
                table,
                row,
                r#"{"key":{"name":"../x","contents":"x"}}"#,
                &good_end,
            ],
            "key file named",
        ),
    ] {
        let e = check(&bad).unwrap_err().to_string();
        assert!(e.contains(why), "{why}: {e}");
    }
    let v2 = header.replace("\"meshid_ca_backup\":1", "\"meshid_ca_backup\":2");
    assert!(check(&[&v2, &good_end])
        .unwrap_err()
        .to_string()
        .contains("format version 2"));
}
