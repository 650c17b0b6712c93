//! The nginx backend of the load benchmarks: one process (`daemon off; master_process off;
//! worker_processes 1`), static 1 KiB and 1 MiB files, `access_log off`, `sendfile on`,
//! keep-alive for up to 1,000,000 requests per connection, `stub_status` for its counters.

use std::path::Path;

/// The nginx binary.
pub const NGINX: &str = "/usr/sbin/nginx";

const CONF: &str = "daemon off;
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
{listen}        root {dir}/www;
        location = /nginx_status {
            stub_status;
        }
    }
}
";

/// Writes the site (`www/1k`, `www/1m`), the temporary directories and `nginx.conf` under
/// `dir`, for a server listening on each address of `listen` (`127.0.0.1:8080`, `8080`);
/// returns nginx's arguments.
pub fn configure(dir: &Path, listen: &[String]) -> Vec<String> {
    std::fs::create_dir_all(dir.join("www")).unwrap();
    std::fs::create_dir_all(dir.join("tmp")).unwrap();
    std::fs::write(dir.join("www/1k"), vec![b'k'; 1024]).unwrap();
    std::fs::write(dir.join("www/1m"), vec![b'm'; 1 << 20]).unwrap();
    let listen: String = listen
        .iter()
        .map(|a| format!("        listen {a} backlog=4096;\n"))
        .collect();
    let conf = dir.join("nginx.conf");
    std::fs::write(
        &conf,
        CONF.replace("{dir}", &dir.display().to_string())
            .replace("{listen}", &listen),
    )
    .unwrap();
    vec![
        "-p".into(),
        dir.display().to_string(),
        "-e".into(),
        dir.join("error.log").display().to_string(),
        "-c".into(),
        conf.display().to_string(),
    ]
}

/// The `accepts` counter in a `/nginx_status` page.
pub fn accepts(status: &str) -> Option<u64> {
    status
        .lines()
        .nth(2)?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}
