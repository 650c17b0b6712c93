//! Backend: one nginx process for every contender.

use std::path::Path;
use std::time::Duration;

use meshid_tests::{free_port, http_get};

use crate::cli::*;
use crate::procs::*;

/// The nginx backend.
pub(crate) struct Backend {
    pub(crate) proc: Guard,
    pub(crate) port: u16,
}

pub(crate) const NGINX_CONF: &str = "daemon off;
master_process off;
worker_processes 1;
worker_rlimit_nofile 16384;
pid {dir}/nginx.pid;
error_log {dir}/error.log error;
events {
    worker_connections 8192;
    multi_accept on;
}
http {
    access_log off;
    default_type application/octet-stream;
    sendfile on;
    tcp_nopush on;
    tcp_nodelay on;
    keepalive_requests 1000000;
    keepalive_timeout 300s;
    open_file_cache max=16;
    client_body_temp_path {dir}/tmp/body;
    proxy_temp_path {dir}/tmp/proxy;
    fastcgi_temp_path {dir}/tmp/fastcgi;
    uwsgi_temp_path {dir}/tmp/uwsgi;
    scgi_temp_path {dir}/tmp/scgi;
    server {
        listen 127.0.0.1:{port} backlog=4096;
        root {dir}/www;
        location = /nginx_status {
            stub_status;
        }
    }
}
";

impl Backend {
    pub(crate) fn start(dir: &Path) -> Backend {
        std::fs::create_dir_all(dir.join("www")).unwrap();
        std::fs::create_dir_all(dir.join("tmp")).unwrap();
        std::fs::write(dir.join("www/1k"), vec![b'k'; 1024]).unwrap();
        std::fs::write(dir.join("www/1m"), vec![b'm'; 1 << 20]).unwrap();
        let port = free_port();
        let conf = dir.join("nginx.conf");
        std::fs::write(
            &conf,
            NGINX_CONF
                .replace("{dir}", &dir.display().to_string())
                .replace("{port}", &port.to_string()),
        )
        .unwrap();
        let args: Vec<String> = vec![
            "-p".into(),
            dir.display().to_string(),
            "-e".into(),
            dir.join("error.log").display().to_string(),
            "-c".into(),
            conf.display().to_string(),
        ];
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
        body.lines().nth(2)?.split_whitespace().next()?.parse().ok()
    }
}
