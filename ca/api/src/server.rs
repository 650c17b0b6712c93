//! Process plumbing shared by meshid's binaries: the shutdown signal, the log subscriber, and
//! the descriptor table.

/// Completes on SIGTERM or Ctrl-C (SIGINT).
pub async fn shutdown_signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term => {}
    }
}

/// Installs the process's log subscriber, writing to stderr: the filter comes from `MESHID_LOG`
/// (e.g. `debug`, `meshid_ca=debug,info`) or `default`; JSON lines when `json`. For binaries
/// only: libraries emit events and never install a subscriber.
pub fn init_tracing(json: bool, default: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("MESHID_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    // Colors only on a terminal: log files and the journal get plain text.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
}

/// The soft limit on open files of this process (from `/proc/self/limits`).
pub fn open_files_limit() -> Option<u64> {
    open_files_limit_in(&std::fs::read_to_string("/proc/self/limits").ok()?)
}

/// The soft limit on open files in `limits`, a process's `/proc/<pid>/limits`.
pub fn open_files_limit_in(limits: &str) -> Option<u64> {
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    line.split_whitespace().nth(3)?.parse().ok()
}

/// Sizes the descriptor table for `descriptors` open at once plus 256 aside, within the
/// open-files limit (see [`reserve_descriptors`]); the size reserved, for the caller's startup
/// log, or `None` (logged) when it cannot.
pub fn size_descriptor_table(descriptors: u64) -> Option<u64> {
    let limit = open_files_limit()?;
    let want = descriptors.saturating_add(256).min(limit);
    match reserve_descriptors(want) {
        Ok(()) => Some(want),
        Err(e) => {
            tracing::warn!(descriptors = want, error = %e, "cannot size the descriptor table: it grows under load instead, each growth stalling the process for a moment");
            None
        }
    }
}

/// The accept queue a TCP listener asks for: the kernel caps it at `net.core.somaxconn` (4096
/// by default since Linux 5.4). A full queue drops the newcomer's handshake, which the caller
/// repeats only a second later; tokio's default of 1024 overflowed in the proxy's storm bench
/// when 1,000 clients connected at once.
pub const LISTEN_BACKLOG: u32 = 65_535;

/// A TCP listener on `addr` (with `SO_REUSEADDR`, as tokio's own `bind`) whose accept queue is
/// [`LISTEN_BACKLOG`]. Needs a tokio runtime.
pub fn listen_tcp(addr: std::net::SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}

/// Sizes this process's descriptor table for `descriptors` open at once, now rather than under
/// load. The kernel grows the table (doubling it) when a new descriptor does not fit, and in a
/// process with more than one thread each growth waits for an RCU grace period inside the
/// `accept` that needed it: the runtime's thread stands still meanwhile, and every connection
/// with it (11 to 16 ms per growth on the benchmark machine, about eight growths while 10,000
/// connections open). The table is sized to hold the highest descriptor, so a duplicate at
/// `descriptors - 1`, closed at once, sizes it for good. It costs the kernel 8 bytes per
/// descriptor (512 KiB for 65,536).
pub fn reserve_descriptors(descriptors: u64) -> std::io::Result<()> {
    let Some(highest) = descriptors
        .checked_sub(1)
        .and_then(|h| rustix::fd::RawFd::try_from(h).ok())
    else {
        return Ok(());
    };
    let null = std::fs::File::open("/dev/null")?;
    drop(rustix::io::fcntl_dupfd_cloexec(&null, highest)?);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The table's size, as the kernel reports it.
    fn table_size() -> u64 {
        let status = std::fs::read_to_string("/proc/self/status").unwrap();
        let line = status.lines().find(|l| l.starts_with("FDSize:")).unwrap();
        line["FDSize:".len()..].trim().parse().unwrap()
    }

    #[test]
    fn reserve_descriptors_sizes_the_table_now_and_keeps_no_descriptor() {
        // Room to grow beyond the table this test process already has.
        let before = table_size();
        let want = before * 4;
        if open_files_limit().unwrap() < want {
            let limit = rustix::process::getrlimit(rustix::process::Resource::Nofile);
            assert!(
                limit.maximum.is_none_or(|max| max >= want),
                "the hard open-files limit ({:?}) leaves no room to grow a table of {before}",
                limit.maximum
            );
            rustix::process::setrlimit(
                rustix::process::Resource::Nofile,
                rustix::process::Rlimit {
                    current: Some(want),
                    maximum: limit.maximum,
                },
            )
            .unwrap();
        }
        reserve_descriptors(want).unwrap();
        assert!(
            table_size() >= want,
            "table {} after reserving {want}",
            table_size()
        );
        // The probe at the top is closed again.
        assert!(!std::path::Path::new(&format!("/proc/self/fd/{}", want - 1)).exists());
        // Past the open-files limit: an error, and nothing held.
        let limit = open_files_limit().unwrap();
        assert!(reserve_descriptors(limit + 1).is_err());
        // Nothing to reserve.
        reserve_descriptors(0).unwrap();
    }
}
