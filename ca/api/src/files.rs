//! Files meshid's binaries write: atomically, with the mode they need (0600 for anything
//! secret), in directories only the owner may enter; and PEM, the form they are written in.

use std::io::{self, Write as _};
use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _, PermissionsExt as _};
use std::path::Path;

use base64::Engine as _;
use zeroize::Zeroizing;

/// Writes `contents` to `path` with `mode`, atomically: a temporary file beside it (created
/// with `mode`, and set to it in case it pre-existed wider: the mode given to open() only
/// narrows through the umask), written, synced, then renamed over `path`. A reader sees the
/// old file or the new one, never a part, and never a wider mode.
pub fn write_atomic(path: &Path, contents: &[u8], mode: u32) -> io::Result<()> {
    // `key.pem` is staged as `.key.pem.tmp`: its own name, so that files written one after
    // another in a directory (`svid.0.pem`, `svid.0.key`) never share a temporary file.
    let mut staged = std::ffi::OsString::from(".");
    staged.push(path.file_name().unwrap_or_default());
    staged.push(".tmp");
    let tmp = path.with_file_name(staged);
    let result = (|| {
        // A leftover of an interrupted write (or anything planted under that name, a symlink
        // included: removing it removes the link, not its target) goes first; then the file is
        // created new, never opened through a link.
        match std::fs::remove_file(&tmp) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&tmp)?;
        f.set_permissions(std::fs::Permissions::from_mode(mode))?;
        f.write_all(contents)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        // The rename itself is durable once the directory is synced.
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::File::open(dir)?.sync_all()?;
        }
        Ok(())
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result.map_err(|e| io::Error::new(e.kind(), format!("cannot write {}: {e}", path.display())))
}

/// [`write_atomic`] with mode 0600: keys, tokens, anything secret.
pub fn write_private(path: &Path, contents: &[u8]) -> io::Result<()> {
    write_atomic(path, contents, 0o600)
}

/// Creates `dir` (and its parents) with mode 0700, and sets 0700 on it if it existed.
pub fn ensure_private_dir(dir: &Path) -> io::Result<()> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
}

/// PEM encoding of DER blocks under `label` (`CERTIFICATE`, ...), lines of 64 characters.
pub fn pem<'a>(label: &str, ders: impl IntoIterator<Item = &'a [u8]>) -> String {
    let mut out = String::new();
    for der in ders {
        pem_into(&mut out, label, der);
    }
    out
}

/// As [`pem`] for one secret block (a private key): every buffer is sized up front (no
/// reallocation leaves a copy behind) and zeroized on drop.
pub fn pem_secret(label: &str, der: &[u8]) -> Zeroizing<String> {
    let b64_len = der.len().div_ceil(3) * 4;
    let mut out = Zeroizing::new(String::with_capacity(
        b64_len + b64_len / 64 + 2 * label.len() + 40,
    ));
    pem_into(&mut out, label, der);
    out
}

fn pem_into(out: &mut String, label: &str, der: &[u8]) {
    let b64 = Zeroizing::new(base64::engine::general_purpose::STANDARD.encode(der));
    out.push_str("-----BEGIN ");
    out.push_str(label);
    out.push_str("-----\n");
    for line in b64.as_bytes().chunks(64) {
        // Base64 output is ASCII, so every chunk is valid UTF-8.
        out.push_str(std::str::from_utf8(line).unwrap_or_default());
        out.push('\n');
    }
    out.push_str("-----END ");
    out.push_str(label);
    out.push_str("-----\n");
}

#[cfg(test)]
mod tests {
    use rustls_pki_types::pem::PemObject as _;

    use super::*;

    #[test]
    fn pem_round_trips_and_wraps_at_64() {
        let der: Vec<u8> = (0..=255u8).collect();
        let text = pem("CERTIFICATE", [der.as_slice(), &der[..10]]);
        assert!(text.lines().all(|l| l.len() <= 64));
        let back: Vec<Vec<u8>> = rustls_pki_types::CertificateDer::pem_slice_iter(text.as_bytes())
            .map(|c| c.unwrap().to_vec())
            .collect();
        assert_eq!(back, vec![der.clone(), der[..10].to_vec()]);
        assert_eq!(
            *pem_secret("PRIVATE KEY", &der),
            pem("PRIVATE KEY", [der.as_slice()])
        );
    }

    #[test]
    fn files_are_written_whole_with_their_mode() {
        let dir = tempfile::tempdir().unwrap();
        let private = dir.path().join("sub/dir");
        ensure_private_dir(&private).unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o7777;
        assert_eq!(mode(&private), 0o700);
        let key = private.join("key.pem");
        // A file that was wider before is narrowed.
        std::fs::write(&key, b"old").unwrap();
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
        write_private(&key, b"secret").unwrap();
        assert_eq!(std::fs::read(&key).unwrap(), b"secret");
        assert_eq!(mode(&key), 0o600);
        write_atomic(&private.join("bundle.pem"), b"x", 0o644).unwrap();
        assert_eq!(mode(&private.join("bundle.pem")), 0o644);
        // Files written one after another in a directory each stage under their own name.
        write_private(&private.join("svid.0.key"), b"k").unwrap();
        write_atomic(&private.join("svid.0.pem"), b"c", 0o644).unwrap();
        assert_eq!(mode(&private.join("svid.0.key")), 0o600);
        assert_eq!(std::fs::read(private.join("svid.0.key")).unwrap(), b"k");
        std::fs::remove_file(private.join("svid.0.key")).unwrap();
        std::fs::remove_file(private.join("svid.0.pem")).unwrap();
        // A symlink planted under the temporary name is replaced, not followed.
        let target = dir.path().join("elsewhere");
        std::fs::write(&target, b"untouched").unwrap();
        std::os::unix::fs::symlink(&target, private.join(".key.pem.tmp")).unwrap();
        write_private(&key, b"again").unwrap();
        assert_eq!(std::fs::read(&target).unwrap(), b"untouched");
        assert_eq!(std::fs::read(&key).unwrap(), b"again");
        // A failed write names the file and leaves nothing behind.
        let err = write_private(&dir.path().join("missing/key.pem"), b"x").unwrap_err();
        assert!(err.to_string().contains("missing/key.pem"), "{err}");
        assert_eq!(std::fs::read_dir(&private).unwrap().count(), 2);
    }

    #[test]
    fn pem_lines() {
        let pem = pem("CERTIFICATE", [&[0u8; 100][..]]);
        let lines: Vec<_> = pem.lines().collect();
        assert_eq!(lines[0], "-----BEGIN CERTIFICATE-----");
        assert_eq!(lines[1].len(), 64);
        assert_eq!(lines[2].len(), 64);
        assert_eq!(lines[3].len(), 136 - 128);
        assert_eq!(lines[4], "-----END CERTIFICATE-----");
        let secret = pem_secret("PRIVATE KEY", &[7u8; 138]);
        assert!(secret.capacity() >= secret.len());
        assert_eq!(
            rustls_pki_types::CertificateDer::from_pem_slice(pem.as_bytes())
                .unwrap()
                .as_ref(),
            &[0u8; 100]
        );
    }
}
