//! Backend: one nginx process for every contender.

use std::path::Path;
use std::time::Duration;

use meshid_bench::nginx;
use meshid_bench::procs::*;
use meshid_tests::{free_port, http_get};

use crate::cli::*;

/// The nginx backend.
pub(crate) struct Backend {
    pub(crate) proc: Guard,
    pub(crate) port: u16,
}

impl Backend {
    pub(crate) fn start(dir: &Path) -> Backend {
        let port = free_port();
        let args = nginx::configure(dir, &[format!("127.0.0.1:{port}")]);
        let mut proc =
            Guard::spawn("nginx", Path::new(NGINX), &args, dir.join("nginx.log"), &[]).unwrap();
        let addr = format!("127.0.0.1:{port}");
        poll(Duration::from_secs(10), "nginx", || {
            proc.check_alive()?;
            Ok(http_get(&addr, "/1k").filter(|(c, b)| *c == 200 && b.len() == 1024))
        })
        .unwrap_or_else(|e| panic!("nginx: {e}\n{}", log_tail(&dir.join("error.log"))));
        Backend { proc, port }
    }

    /// nginx's `accepts` counter.
    pub(crate) fn accepts(&self) -> Option<u64> {
        let (_, body) = http_get(&format!("127.0.0.1:{}", self.port), "/nginx_status")?;
        nginx::accepts(&body)
    }
}
