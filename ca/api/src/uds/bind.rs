//! Binding a server's Unix socket: taking over a stale one, refusing a live one, and never
//! exposing the socket with a wider mode than it is meant to have.

use std::io;
use std::os::unix::fs::{DirBuilderExt as _, FileTypeExt as _, PermissionsExt as _};
use std::path::Path;

use tokio::net::UnixListener;

use crate::files::ensure_private_dir;

/// Who may connect to a socket (file permissions; the server may still authenticate callers).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Its owner only: socket 0600, a missing directory created 0700 (the CA's admin socket).
    Owner,
    /// Every local user: socket 0777, a missing directory created 0755 (the Workload API,
    /// whose callers are authenticated by attestation, not by file permissions, as the SPIFFE
    /// Workload Endpoint requires).
    Everyone,
}

/// Binds a Unix socket at `path` for `access`. A stale socket (nothing listening) is replaced;
/// a live one, or anything that is not a socket, is an error. The socket is bound in a fresh
/// private directory beside `path`, given its mode, then linked into place (refused if
/// something appeared there meanwhile), so it never exists at `path` with another mode.
pub fn bind(path: &Path, access: Access) -> io::Result<UnixListener> {
    let parent = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or_else(|| Path::new("."));
    if !parent.exists() {
        match access {
            Access::Owner => ensure_private_dir(parent)?,
            Access::Everyone => {
                std::fs::create_dir_all(parent)?;
                std::fs::set_permissions(parent, std::fs::Permissions::from_mode(0o755))?;
            }
        }
    }
    take_over(path)?;
    let staging = parent.join(format!(
        ".sock-{}-{:016x}",
        std::process::id(),
        rand::random::<u64>()
    ));
    // Created here and now (not an existing directory someone prepared), owner only.
    std::fs::DirBuilder::new().mode(0o700).create(&staging)?;
    let result = (|| {
        let tmp = staging.join("s");
        let listener = UnixListener::bind(&tmp)?;
        let mode = match access {
            Access::Owner => 0o600,
            Access::Everyone => 0o777,
        };
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(mode))?;
        // A link, not a rename: it fails if another server put a socket at `path` since the
        // take-over above, where a rename would silently replace it.
        std::fs::hard_link(&tmp, path).map_err(|e| {
            if e.kind() == io::ErrorKind::AlreadyExists {
                io::Error::new(
                    io::ErrorKind::AddrInUse,
                    format!("{} was bound by another server meanwhile", path.display()),
                )
            } else {
                e
            }
        })?;
        Ok(listener)
    })();
    let _ = std::fs::remove_dir_all(&staging);
    result
}

/// Clears `path` for a new socket: nothing there, or a socket no one listens on (removed).
fn take_over(path: &Path) -> io::Result<()> {
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => {
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                return Err(io::Error::new(
                    io::ErrorKind::AddrInUse,
                    format!("{} is in use by a running server", path.display()),
                ));
            }
            std::fs::remove_file(path)
        }
        Ok(_) => Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            format!(
                "{} exists and is not a socket; refusing to replace it",
                path.display()
            ),
        )),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn sockets_get_their_mode_and_a_live_one_is_kept() {
        let dir = tempfile::tempdir().unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o7777;
        let owner = dir.path().join("private/admin.sock");
        let l = bind(&owner, Access::Owner).unwrap();
        assert_eq!(mode(&owner), 0o600);
        assert_eq!(mode(owner.parent().unwrap()), 0o700);
        // Live: refused. Stale: replaced.
        let err = bind(&owner, Access::Owner).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::AddrInUse);
        drop(l);
        let _l = bind(&owner, Access::Owner).unwrap();
        let everyone = dir.path().join("public/api.sock");
        let _e = bind(&everyone, Access::Everyone).unwrap();
        assert_eq!(mode(&everyone), 0o777);
        assert_eq!(mode(everyone.parent().unwrap()), 0o755);
        // Not a socket: left alone.
        let file = dir.path().join("file");
        std::fs::write(&file, b"x").unwrap();
        assert_eq!(
            bind(&file, Access::Owner).unwrap_err().kind(),
            io::ErrorKind::AlreadyExists
        );
        assert_eq!(std::fs::read(&file).unwrap(), b"x");
        // No staging directory is left behind.
        let left: Vec<_> = std::fs::read_dir(dir.path().join("private"))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(left, vec![std::ffi::OsString::from("admin.sock")]);
    }
}
