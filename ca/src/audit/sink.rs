//! Where audit lines go besides the datastore: an append-only JSON-lines file (on a volume of
//! its own) and syslog (RFC 5424 over a Unix datagram socket, `/dev/log` by default). Each sink
//! knows the last record it holds, so shipping resumes there after a restart or an outage.

use std::io::{Read as _, Seek as _, SeekFrom, Write as _};
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};

use super::export::Line;

/// The last record a sink holds: (seq, hash); `(0, [0; 32])` for none.
pub type Cursor = (i64, [u8; 32]);

/// The append-only JSON-lines file.
#[derive(Debug)]
pub struct FileSink {
    path: PathBuf,
    file: std::fs::File,
}

impl FileSink {
    /// Opens (or creates, mode 0600, with its directory) the file, and returns it with the
    /// last record it holds. An incomplete last line (a write cut by a crash: it was never
    /// acknowledged) is removed; anything else that does not parse is an error, since
    /// appending after it would hide it.
    pub fn open(path: &Path) -> std::io::Result<(Self, Cursor)> {
        let ctx =
            |e: std::io::Error| std::io::Error::new(e.kind(), format!("{}: {e}", path.display()));
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(ctx)?;
        }
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .mode(0o600)
            .open(path)
            .map_err(ctx)?;
        // One writer per file: another CA server (or a second instance) pointed at the same
        // path would interleave its lines with ours.
        file.try_lock().map_err(|e| {
            std::io::Error::new(
                std::io::ErrorKind::WouldBlock,
                format!(
                    "{}: another process holds it ({e:?}); give each CA server a file of its own",
                    path.display()
                ),
            )
        })?;
        let len = file.metadata().map_err(ctx)?.len();
        let (complete, cursor) = last_record(&mut file, len).map_err(ctx)?;
        if complete < len {
            tracing::warn!(path = %path.display(), bytes = len - complete, "audit file: removing an incomplete last line (a write cut short)");
            file.set_len(complete).map_err(ctx)?;
            file.sync_all().map_err(ctx)?;
        }
        Ok((
            Self {
                path: path.to_owned(),
                file,
            },
            cursor,
        ))
    }

    /// Whether the path still names the file this sink writes (it was not moved aside or
    /// rotated away).
    pub fn still_at_path(&self) -> bool {
        use std::os::unix::fs::MetadataExt as _;
        match (std::fs::metadata(&self.path), self.file.metadata()) {
            (Ok(at_path), Ok(ours)) => at_path.ino() == ours.ino() && at_path.dev() == ours.dev(),
            _ => false,
        }
    }

    /// Appends lines and makes them durable before returning.
    pub fn append(&mut self, lines: &[Line]) -> std::io::Result<()> {
        let mut buf = Vec::new();
        for l in lines {
            buf.extend_from_slice(l.to_json().as_bytes());
            buf.push(b'\n');
        }
        self.file
            .write_all(&buf)
            .and_then(|()| self.file.sync_data())
            .map_err(|e| std::io::Error::new(e.kind(), format!("{}: {e}", self.path.display())))
    }
}

/// Scans back from the end for the last complete line that is a record. Returns the length up
/// to the last newline and the record's cursor.
fn last_record(file: &mut std::fs::File, len: u64) -> std::io::Result<(u64, Cursor)> {
    const CHUNK: u64 = 64 * 1024;
    let mut tail: Vec<u8> = Vec::new();
    let mut pos = len;
    let mut complete: Option<u64> = None;
    loop {
        // `tail` holds bytes [pos, end-of-scan); look for whole lines in it.
        if let Some(end) = complete {
            let upto = usize::try_from(end - pos).unwrap_or(0);
            let body = &tail[..upto];
            // Lines within body, last first; the first may be partial unless pos == 0.
            let mut stop = body.len();
            while stop > 0 {
                let start = body[..stop - 1]
                    .iter()
                    .rposition(|&b| b == b'\n')
                    .map_or(0, |i| i + 1);
                if start == 0 && pos > 0 {
                    break; // may be partial: read more
                }
                let line = &body[start..stop - 1];
                match serde_json::from_slice::<Line>(line) {
                    Ok(Line::Record(r)) => {
                        let rec = r.record().ok_or_else(|| invalid("a record line's hash is not hex"))?;
                        return Ok((end, (rec.seq, rec.hash)));
                    }
                    Ok(_) => {}
                    Err(e) => {
                        return Err(invalid(&format!(
                            "a line near byte {} is not an audit line ({e}); move the file aside to start a new one",
                            pos + start as u64
                        )))
                    }
                }
                stop = start;
            }
            if pos == 0 {
                return Ok((end, (0, [0; 32])));
            }
        }
        if pos == 0 {
            // No newline at all: everything is an incomplete line.
            return Ok((0, (0, [0; 32])));
        }
        let step = CHUNK.min(pos);
        pos -= step;
        let mut chunk = vec![0; usize::try_from(step).unwrap_or(0)];
        file.seek(SeekFrom::Start(pos))?;
        file.read_exact(&mut chunk)?;
        chunk.extend_from_slice(&tail);
        tail = chunk;
        if complete.is_none() {
            if let Some(i) = tail.iter().rposition(|&b| b == b'\n') {
                complete = Some(pos + i as u64 + 1);
            }
        }
    }
}

fn invalid(msg: &str) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, msg.to_owned())
}

/// The largest syslog message sent; a longer record's details are replaced by their size and
/// SHA-256 (the file sink and the datastore hold them whole).
pub const MAX_SYSLOG_MESSAGE: usize = 16 * 1024;

/// Syslog over a Unix datagram socket.
#[derive(Debug)]
pub struct SyslogSink {
    socket: std::os::unix::net::UnixDatagram,
    path: PathBuf,
    hostname: String,
    cursor_path: PathBuf,
}

impl SyslogSink {
    /// A sink sending to the socket at `path`, keeping its cursor in `cursor_path` (the last
    /// record sent, so a restart resumes after it).
    pub fn open(path: &Path, cursor_path: &Path) -> std::io::Result<(Self, Cursor)> {
        let socket = std::os::unix::net::UnixDatagram::unbound()?;
        let hostname = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_owned())
            .ok()
            .filter(|h| !h.is_empty() && h.is_ascii() && !h.contains(' '))
            .unwrap_or_else(|| "-".to_owned());
        let cursor = match std::fs::read_to_string(cursor_path) {
            Ok(text) => parse_cursor(&text).ok_or_else(|| {
                invalid(&format!(
                    "{}: not a syslog cursor (\"<seq> <hash>\"); remove it to resend everything",
                    cursor_path.display()
                ))
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => (0, [0; 32]),
            Err(e) => return Err(e),
        };
        Ok((
            Self {
                socket,
                path: path.to_owned(),
                hostname,
                cursor_path: cursor_path.to_owned(),
            },
            cursor,
        ))
    }

    /// Sends each line as one message (facility authpriv; notice, or alert for a fault), then
    /// saves the cursor.
    pub fn send(&mut self, lines: &[Line], cursor: Cursor) -> std::io::Result<()> {
        let pid = std::process::id();
        for line in lines {
            let severity = if matches!(line, Line::Fault(_)) { 1 } else { 5 };
            let pri = 10 * 8 + severity;
            let msg = syslog_body(line);
            let ts = humantime::format_rfc3339_micros(std::time::SystemTime::now());
            let datagram = format!(
                "<{pri}>1 {ts} {} meshid-ca {pid} audit - {msg}",
                self.hostname
            );
            self.socket
                .send_to(datagram.as_bytes(), &self.path)
                .map_err(|e| {
                    std::io::Error::new(e.kind(), format!("syslog {}: {e}", self.path.display()))
                })?;
        }
        meshid_api::files::write_atomic(
            &self.cursor_path,
            format!("{} {}\n", cursor.0, hex::encode(cursor.1)).as_bytes(),
            0o600,
        )
    }
}

fn parse_cursor(text: &str) -> Option<Cursor> {
    let (seq, hash) = text.trim().split_once(' ')?;
    Some((seq.parse().ok()?, hex::decode(hash).ok()?.try_into().ok()?))
}

/// A line as a syslog message: its JSON, or for an oversized record, the record without its
/// details but with their size and digest.
fn syslog_body(line: &Line) -> String {
    let json = line.to_json();
    if json.len() <= MAX_SYSLOG_MESSAGE {
        return json;
    }
    match line {
        Line::Record(r) => {
            use sha2::Digest as _;
            let mut r = r.clone();
            let digest = hex::encode(sha2::Sha256::digest(r.details.as_bytes()));
            r.details =
                serde_json::json!({"truncated": true, "bytes": r.details.len(), "sha256": digest})
                    .to_string();
            Line::Record(r).to_json()
        }
        _ => json,
    }
}

#[cfg(test)]
mod tests;
