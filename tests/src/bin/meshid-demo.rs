//! `meshid-demo`: the quickstart's tiny demo service (`deploy/quickstart.sh`). A plaintext
//! HTTP/1.1 server that answers every request with `hello from NAME (METHOD PATH)`, so the
//! quickstart can show which service a call reached through the proxies. Not a real server:
//! no TLS, no request bodies beyond `Content-Length`, one thread per connection.
//!
//! ```text
//! meshid-demo --name api --listen 127.0.0.1:18200
//! ```

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};

fn usage() -> ! {
    eprintln!("usage: meshid-demo --name NAME --listen HOST:PORT");
    std::process::exit(64);
}

fn main() {
    let (mut name, mut listen) = (None, None);
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--name" => name = args.next(),
            "--listen" => listen = args.next(),
            _ => usage(),
        }
    }
    let (Some(name), Some(listen)) = (name, listen) else {
        usage()
    };
    let listener = match TcpListener::bind(&listen) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("meshid-demo {name}: cannot listen on {listen}: {e}");
            std::process::exit(1);
        }
    };
    eprintln!("meshid-demo {name}: serving HTTP on {listen}");
    for stream in listener.incoming().flatten() {
        let name = name.clone();
        std::thread::spawn(move || {
            if let Err(e) = serve(&name, stream) {
                eprintln!("meshid-demo {name}: connection ended: {e}");
            }
        });
    }
}

/// Answers requests on one connection until the peer closes it or asks to.
fn serve(name: &str, stream: TcpStream) -> std::io::Result<()> {
    let mut writer = stream.try_clone()?;
    let mut reader = BufReader::new(stream);
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 {
            return Ok(());
        }
        let mut parts = line.split_whitespace();
        let (method, path) = (parts.next().unwrap_or("?"), parts.next().unwrap_or("?"));
        let (method, path) = (method.to_owned(), path.to_owned());
        let (mut length, mut close) = (0u64, false);
        loop {
            let mut header = String::new();
            if reader.read_line(&mut header)? == 0 {
                return Ok(());
            }
            let header = header.trim_end();
            if header.is_empty() {
                break;
            }
            let (key, value) = header.split_once(':').unwrap_or((header, ""));
            let value = value.trim();
            if key.eq_ignore_ascii_case("content-length") {
                length = value.parse().unwrap_or(0);
            } else if key.eq_ignore_ascii_case("transfer-encoding") {
                close = true; // chunked bodies are not read: answer, then close
            } else if key.eq_ignore_ascii_case("connection") {
                close |= value.eq_ignore_ascii_case("close");
            }
        }
        std::io::copy(&mut (&mut reader).take(length), &mut std::io::sink())?;
        eprintln!("meshid-demo {name}: {method} {path}");
        let body = format!("hello from {name} ({method} {path})\n");
        write!(
            writer,
            "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: {}\r\n{}\r\n{body}",
            body.len(),
            if close { "connection: close\r\n" } else { "" },
        )?;
        writer.flush()?;
        if close {
            return Ok(());
        }
    }
}
