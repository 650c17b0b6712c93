//! `meshid-ca backup` and `meshid-ca restore`: a consistent online snapshot of the datastore
//! ([`crate::store::sql::dump`]) and the CA server's key files, in one file encrypted with age
//! (a passphrase, through scrypt, or X25519 recipients), written 0600; and its restoration into
//! a fresh data directory and an empty datastore, all or nothing.
//!
//! Inside the encryption, the backup is JSON lines ([`BackupLine`]): a header, the dump, the
//! key files, and an end line with the counts, so a cut file is refused. age authenticates
//! every chunk and the end of the stream.
//!
//! A restore reads the whole backup once without writing anything (a wrong key, a damaged or
//! cut file, another trust domain are refused there), then again to write it: the rows in one
//! transaction, the keys into a directory renamed into place after the commit.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::DirBuilderExt as _;
use std::path::{Path, PathBuf};

use age::secrecy::SecretString;
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use crate::store::sql::dump::DumpLine;
use crate::store::sql::SqlStore;
use crate::store::Datastore as _;

/// The format's version.
pub const FORMAT: u32 = 1;
/// The longest line read from a backup.
const MAX_LINE: u64 = 256 << 20;

/// The first line.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Header {
    /// [`FORMAT`].
    pub meshid_ca_backup: u32,
    /// Unix seconds.
    pub created_at: i64,
    /// The trust domain.
    pub trust_domain: String,
    /// The CA server whose keys these are.
    pub server_id: String,
    /// `sqlite` or `postgres`.
    pub backend: String,
    /// The datastore's schema version.
    pub schema_version: i64,
}

/// A key file of the data directory's `keys/`.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyFile {
    /// Its file name.
    pub name: String,
    /// Its contents (PEM).
    pub contents: String,
}

impl std::fmt::Debug for KeyFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyFile")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

impl Drop for KeyFile {
    fn drop(&mut self) {
        use zeroize::Zeroize as _;
        self.contents.zeroize();
    }
}

/// What a backup holds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Counts {
    /// Tables.
    pub tables: u64,
    /// Rows.
    pub rows: u64,
    /// Key files.
    pub keys: u64,
}

/// One line of a backup.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BackupLine {
    /// The first.
    Header(Header),
    /// The datastore.
    Dump(DumpLine),
    /// A key file.
    Key(KeyFile),
    /// The last, with the counts of what came before.
    End(Counts),
}

/// How a backup is encrypted.
pub enum Protection {
    /// A passphrase (scrypt).
    Passphrase(SecretString),
    /// X25519 recipients (`age1...`): any of their identities decrypts.
    Recipients(Vec<age::x25519::Recipient>),
}

/// How a backup is decrypted.
pub enum Unlock {
    /// The passphrase.
    Passphrase(SecretString),
    /// Identities from an age identity file (`AGE-SECRET-KEY-1...`).
    Identities(Vec<Box<dyn age::Identity>>),
}

/// Why a backup or restore failed.
#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    /// The backup could not be decrypted: the wrong passphrase or identity, or not an age file.
    #[error("cannot decrypt the backup ({0}): the wrong passphrase or identity, or not a meshid-ca backup; nothing was written")]
    Decrypt(String),
    /// The backup is damaged, cut, or not ours.
    #[error("the backup is damaged or not a meshid-ca backup: {0}; nothing was written")]
    Invalid(String),
    /// The target is not fresh, or not for this backup.
    #[error("{0}; nothing was written")]
    Refused(String),
    /// The datastore.
    #[error("datastore: {0}")]
    Store(#[from] crate::store::StoreError),
    /// Files.
    #[error("{0}")]
    Io(String),
}

fn io_err(what: &str, path: &Path, e: std::io::Error) -> BackupError {
    BackupError::Io(format!("cannot {what} {}: {e}", path.display()))
}

/// Reads a passphrase from a file (mode 0600 or stricter; the first line).
pub fn passphrase_file(path: &Path) -> Result<SecretString, BackupError> {
    meshid_api::config::check_private(path, "passphrase file")
        .map_err(|e| BackupError::Refused(e.to_string()))?;
    let text = Zeroizing::new(std::fs::read_to_string(path).map_err(|e| io_err("read", path, e))?);
    let line = text.lines().next().unwrap_or("");
    if line.is_empty() {
        return Err(BackupError::Refused(format!(
            "{}: the passphrase is empty",
            path.display()
        )));
    }
    Ok(SecretString::from(line.to_owned()))
}

/// Reads the identities of an age identity file (mode 0600 or stricter).
pub fn identity_file(path: &Path) -> Result<Vec<Box<dyn age::Identity>>, BackupError> {
    meshid_api::config::check_private(path, "identity file")
        .map_err(|e| BackupError::Refused(e.to_string()))?;
    let file = std::fs::File::open(path).map_err(|e| io_err("open", path, e))?;
    age::IdentityFile::from_buffer(BufReader::new(file))
        .map_err(|e| io_err("read", path, e))?
        .into_identities()
        .map_err(|e| BackupError::Refused(format!("{}: {e}", path.display())))
}

/// Writes a backup of `store` and the key files in `key_dir` to `out` (through a temporary
/// file, mode 0600, renamed into place once complete and synced).
pub async fn backup(
    store: &SqlStore,
    key_dir: &Path,
    header: Header,
    out: &Path,
    protection: Protection,
) -> Result<Counts, BackupError> {
    use std::os::unix::fs::OpenOptionsExt as _;
    let encryptor = match protection {
        Protection::Passphrase(p) => age::Encryptor::with_user_passphrase(p),
        Protection::Recipients(rs) => age::Encryptor::with_recipients(
            rs.iter().map(|r| r as &dyn age::Recipient),
        )
        .map_err(|e| BackupError::Refused(format!("cannot encrypt to these recipients: {e}")))?,
    };
    let mut tmp = out.as_os_str().to_owned();
    tmp.push(format!(".tmp-{}", std::process::id()));
    let tmp = PathBuf::from(tmp);
    let file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(|e| io_err("create", &tmp, e))?;
    let result = async {
        let mut w = encryptor
            .wrap_output(std::io::BufWriter::new(file))
            .map_err(|e| io_err("write", &tmp, e))?;
        let mut put = |line: &BackupLine| -> std::io::Result<()> {
            serde_json::to_writer(&mut w, line)?;
            w.write_all(b"\n")
        };
        put(&BackupLine::Header(header)).map_err(|e| io_err("write", &tmp, e))?;
        let (tables, rows) = store.dump(|l| put(&BackupLine::Dump(l))).await?;
        let keys = read_keys(key_dir)?;
        for k in &keys {
            put(&BackupLine::Key(k.clone())).map_err(|e| io_err("write", &tmp, e))?;
        }
        let counts = Counts {
            tables,
            rows,
            keys: keys.len() as u64,
        };
        put(&BackupLine::End(counts)).map_err(|e| io_err("write", &tmp, e))?;
        let file = w
            .finish()
            .and_then(|b| b.into_inner().map_err(|e| e.into_error()))
            .map_err(|e| io_err("write", &tmp, e))?;
        file.sync_all().map_err(|e| io_err("sync", &tmp, e))?;
        std::fs::rename(&tmp, out).map_err(|e| io_err("rename to", out, e))?;
        if let Some(dir) = out.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::File::open(dir)
                .and_then(|d| d.sync_all())
                .map_err(|e| io_err("sync", dir, e))?;
        }
        Ok(counts)
    }
    .await;
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

fn read_keys(key_dir: &Path) -> Result<Vec<KeyFile>, BackupError> {
    let mut keys = Vec::new();
    let entries = match std::fs::read_dir(key_dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(keys),
        Err(e) => return Err(io_err("read", key_dir, e)),
    };
    for entry in entries {
        let entry = entry.map_err(|e| io_err("read", key_dir, e))?;
        let path = entry.path();
        if !entry
            .file_type()
            .map_err(|e| io_err("read", &path, e))?
            .is_file()
        {
            continue;
        }
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with('.') {
            continue;
        }
        let contents = std::fs::read_to_string(&path).map_err(|e| io_err("read", &path, e))?;
        keys.push(KeyFile { name, contents });
    }
    keys.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(keys)
}

/// The decrypted lines of a backup, one at a time.
struct Lines {
    reader: Box<dyn BufRead + Send>,
    buf: Vec<u8>,
    n: usize,
}

/// Reads a file and hashes what it read (the ciphertext), so that a restore's second read can
/// be shown to be of the same bytes as the first.
struct Hashing {
    file: std::fs::File,
    hash: std::sync::Arc<std::sync::Mutex<sha2::Sha256>>,
}

impl std::io::Read for Hashing {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        use sha2::Digest as _;
        let n = self.file.read(buf)?;
        self.hash
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .update(&buf[..n]);
        Ok(n)
    }
}

impl Lines {
    fn open(path: &Path, unlock: &Unlock) -> Result<Self, BackupError> {
        let file = std::fs::File::open(path).map_err(|e| io_err("open", path, e))?;
        Self::decrypt(file, unlock)
    }

    /// Decrypts from the start of `file` (a handle of its own, positioned at 0).
    fn decrypt(
        file: impl std::io::Read + Send + 'static,
        unlock: &Unlock,
    ) -> Result<Self, BackupError> {
        let decryptor = age::Decryptor::new_buffered(BufReader::new(file))
            .map_err(|e| BackupError::Decrypt(e.to_string()))?;
        let reader = match unlock {
            Unlock::Passphrase(p) => {
                let id = age::scrypt::Identity::new(p.clone());
                decryptor.decrypt(std::iter::once(&id as &dyn age::Identity))
            }
            Unlock::Identities(ids) => decryptor.decrypt(ids.iter().map(|i| i.as_ref())),
        }
        .map_err(|e| BackupError::Decrypt(e.to_string()))?;
        Ok(Self {
            reader: Box::new(BufReader::new(reader)),
            buf: Vec::new(),
            n: 0,
        })
    }

    fn next_line(&mut self) -> Result<Option<BackupLine>, BackupError> {
        use std::io::Read as _;
        self.buf.clear();
        let read = (&mut self.reader)
            .take(MAX_LINE + 1)
            .read_until(b'\n', &mut self.buf)
            .map_err(|e| BackupError::Invalid(format!("after line {}: {e}", self.n)))?;
        if read == 0 {
            return Ok(None);
        }
        self.n += 1;
        if read as u64 > MAX_LINE || self.buf.last() != Some(&b'\n') {
            return Err(BackupError::Invalid(format!(
                "line {} is cut or too long",
                self.n
            )));
        }
        // serde's message can quote the value it did not expect: only its position is said.
        serde_json::from_slice(&self.buf).map(Some).map_err(|e| {
            BackupError::Invalid(format!(
                "line {} is not a backup line ({:?} error at column {})",
                self.n,
                e.classify(),
                e.column()
            ))
        })
    }
}

impl Drop for Lines {
    fn drop(&mut self) {
        use zeroize::Zeroize as _;
        self.buf.zeroize();
    }
}

/// Reads the whole backup without writing anything: the header, and checks every line and the
/// end counts. Returns the header and the counts.
pub fn inspect(path: &Path, unlock: &Unlock) -> Result<(Header, Counts), BackupError> {
    check_lines(Lines::open(path, unlock)?)
}

/// [`inspect`] of a backup's decrypted text (for tests and the fuzz target).
pub fn check_plaintext(
    text: impl BufRead + Send + 'static,
) -> Result<(Header, Counts), BackupError> {
    check_lines(Lines {
        reader: Box::new(text),
        buf: Vec::new(),
        n: 0,
    })
}

fn check_lines(mut lines: Lines) -> Result<(Header, Counts), BackupError> {
    let header = match lines.next_line()? {
        Some(BackupLine::Header(h)) if h.meshid_ca_backup == FORMAT => h,
        Some(BackupLine::Header(h)) => {
            return Err(BackupError::Invalid(format!(
                "format version {} (this meshid-ca reads {FORMAT})",
                h.meshid_ca_backup
            )))
        }
        _ => return Err(BackupError::Invalid("no header".to_owned())),
    };
    let mut seen = Counts::default();
    let mut table = false;
    loop {
        match lines.next_line()? {
            Some(BackupLine::Dump(DumpLine::Table { .. })) if seen.keys == 0 => {
                seen.tables += 1;
                table = true;
            }
            Some(BackupLine::Dump(DumpLine::Row(_))) if table && seen.keys == 0 => seen.rows += 1,
            Some(BackupLine::Key(k)) => {
                if !valid_key_name(&k.name) {
                    return Err(BackupError::Invalid(format!(
                        "a key file named {:?}",
                        k.name
                    )));
                }
                seen.keys += 1;
            }
            Some(BackupLine::End(counts)) => {
                if counts != seen {
                    return Err(BackupError::Invalid(format!(
                        "it says {counts:?} but holds {seen:?}"
                    )));
                }
                if lines.next_line()?.is_some() {
                    return Err(BackupError::Invalid("lines after the end".to_owned()));
                }
                return Ok((header, counts));
            }
            Some(_) => {
                return Err(BackupError::Invalid(format!(
                    "line {} is out of place",
                    lines.n
                )))
            }
            None => {
                return Err(BackupError::Invalid(
                    "it ends before its end line (cut short)".to_owned(),
                ))
            }
        }
    }
}

fn valid_key_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 255
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

/// Where a restore goes.
pub struct Target<'a> {
    /// The datastore URL (`sqlite://...` or `postgres://...`).
    pub datastore: &'a str,
    /// The data directory (its `keys/` must be absent or empty).
    pub data_dir: &'a Path,
    /// The trust domain the restored server is configured for.
    pub trust_domain: &'a str,
}

/// Restores `path` into `target`, all or nothing. Returns the header and counts.
///
/// The file is opened once and read twice through the same handle: first to check everything
/// without writing (a wrong key, a damaged or cut file, another trust domain or schema, a target
/// that is not fresh are refused here), then to write, in one datastore transaction that
/// commits only after the key files are staged and the second read is shown to be the same
/// ciphertext as the first. Only the rename of the staged keys into place follows the commit.
pub async fn restore(
    path: &Path,
    unlock: &Unlock,
    target: Target<'_>,
) -> Result<(Header, Counts), BackupError> {
    use sha2::Digest as _;
    use std::io::Seek as _;
    let file = std::fs::File::open(path).map_err(|e| io_err("open", path, e))?;
    let hashed = |file: &std::fs::File| -> Result<
        (Lines, std::sync::Arc<std::sync::Mutex<sha2::Sha256>>),
        BackupError,
    > {
        let mut f = file.try_clone().map_err(|e| io_err("read", path, e))?;
        f.seek(std::io::SeekFrom::Start(0))
            .map_err(|e| io_err("read", path, e))?;
        let hash = std::sync::Arc::new(std::sync::Mutex::new(sha2::Sha256::new()));
        let lines = Lines::decrypt(
            Hashing {
                file: f,
                hash: std::sync::Arc::clone(&hash),
            },
            unlock,
        )?;
        Ok((lines, hash))
    };
    let digest = |h: &std::sync::Arc<std::sync::Mutex<sha2::Sha256>>| {
        h.lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
            .finalize()
    };

    // Pass 1: read everything, write nothing.
    let (lines, hash1) = hashed(&file)?;
    let (header, counts) = check_lines(lines)?;
    let first = digest(&hash1);
    if header.trust_domain != target.trust_domain {
        return Err(BackupError::Refused(format!(
            "the backup is of trust domain {}, the configuration's is {}",
            header.trust_domain, target.trust_domain
        )));
    }
    if header.schema_version != crate::store::sql::SCHEMA_VERSION {
        return Err(BackupError::Refused(format!(
            "the backup is of schema version {}, this meshid-ca's is {}: restore it with the meshid-ca version that made it, then upgrade",
            header.schema_version,
            crate::store::sql::SCHEMA_VERSION
        )));
    }
    let key_dir = target.data_dir.join("keys");
    if std::fs::read_dir(&key_dir).is_ok_and(|mut d| d.next().is_some()) {
        return Err(BackupError::Refused(format!(
            "{} is not empty: restore into a fresh data directory",
            key_dir.display()
        )));
    }
    let sqlite_file = target
        .datastore
        .strip_prefix("sqlite://")
        .map(PathBuf::from);
    match &sqlite_file {
        Some(f) if f.exists() => {
            return Err(BackupError::Refused(format!(
                "{} exists: restore into a fresh data directory",
                f.display()
            )))
        }
        Some(_) => {}
        None => {
            // Looked at as it is, before anything (a migration included) touches it.
            let store = SqlStore::open_unmigrated(target.datastore).await?;
            let fresh = store.check_fresh().await;
            store.close().await;
            fresh.map_err(|e| BackupError::Refused(e.to_string()))?;
        }
    }

    // Pass 2: write.
    crate::authority::ensure_private_dir(target.data_dir)
        .map_err(|e| io_err("create", target.data_dir, e))?;
    let staging = target
        .data_dir
        .join(format!(".keys.restore-{}", std::process::id()));
    let result = async {
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&staging)
            .map_err(|e| io_err("create", &staging, e))?;
        let store = SqlStore::open(target.datastore).await?;
        let written = write_all(hashed(&file)?, &first, &store, &staging, counts).await;
        store.close().await;
        written?;
        std::fs::rename(&staging, &key_dir).map_err(|e| io_err("rename to", &key_dir, e))?;
        std::fs::File::open(target.data_dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| io_err("sync", target.data_dir, e))?;
        Ok(())
    }
    .await;
    if let Err(e) = result {
        let _ = std::fs::remove_dir_all(&staging);
        if let Some(f) = &sqlite_file {
            for suffix in ["", "-wal", "-shm"] {
                let mut p = f.clone().into_os_string();
                p.push(suffix);
                let _ = std::fs::remove_file(p);
            }
        }
        return Err(e);
    }
    Ok((header, counts))
}

/// Pass 2 of [`restore`]: the dump into `store` in one transaction, which commits once the key
/// files are staged, the counts match pass 1's and the ciphertext read is pass 1's (`first`).
async fn write_all(
    (lines, hash): (Lines, std::sync::Arc<std::sync::Mutex<sha2::Sha256>>),
    first: &[u8],
    store: &SqlStore,
    staging: &Path,
    expected: Counts,
) -> Result<(), BackupError> {
    use sha2::Digest as _;
    let lines = std::cell::RefCell::new(lines);
    let Some(BackupLine::Header(header)) = lines.borrow_mut().next_line()? else {
        return Err(BackupError::Invalid("no header".to_owned()));
    };
    // The dump streams from the file into the transaction; the line after it (a key or the
    // end) is kept for what follows.
    let after = std::cell::RefCell::new(None);
    let failed = std::cell::RefCell::new(None);
    let dump = std::iter::from_fn(|| {
        if after.borrow().is_some() || failed.borrow().is_some() {
            return None;
        }
        match lines.borrow_mut().next_line() {
            Ok(Some(BackupLine::Dump(d))) => Some(Ok(d)),
            Ok(other) => {
                *after.borrow_mut() = Some(other);
                None
            }
            Err(e) => {
                let msg = e.to_string();
                *failed.borrow_mut() = Some(e);
                Some(Err(msg))
            }
        }
    });
    let before_commit = |tables: u64, rows: u64| -> Result<(), String> {
        let mut keys = 0;
        let mut next = after.borrow_mut().take().flatten();
        while let Some(line) = next {
            match line {
                BackupLine::Key(k) => {
                    if !valid_key_name(&k.name) {
                        return Err(format!("a key file named {:?}", k.name));
                    }
                    let p = staging.join(&k.name);
                    meshid_api::files::write_private(&p, k.contents.as_bytes())
                        .map_err(|e| format!("cannot write {}: {e}", p.display()))?;
                    keys += 1;
                }
                BackupLine::End(_) => {}
                _ => return Err(format!("line {} is out of place", lines.borrow().n)),
            }
            next = lines.borrow_mut().next_line().map_err(|e| e.to_string())?;
        }
        if (Counts { tables, rows, keys }) != expected {
            return Err("it changed between the two reads".to_owned());
        }
        let second = hash
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
            .finalize();
        if second.as_slice() != first {
            return Err("the file changed between the two reads".to_owned());
        }
        Ok(())
    };
    let restored = store
        .restore_then(header.schema_version, dump, before_commit)
        .await;
    if let Some(e) = failed.into_inner() {
        return Err(e);
    }
    restored?;
    Ok(())
}

/// What [`backup`] puts in the header, for `store` as configured.
pub async fn header(
    store: &SqlStore,
    trust_domain: &str,
    server_id: &str,
) -> Result<Header, BackupError> {
    Ok(Header {
        meshid_ca_backup: FORMAT,
        created_at: crate::unix_now(),
        trust_domain: trust_domain.to_owned(),
        server_id: server_id.to_owned(),
        backend: store.backend().to_owned(),
        schema_version: store.schema_version().await?,
    })
}

#[cfg(test)]
mod tests;
