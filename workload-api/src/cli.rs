//! The binary's commands besides `run`: `api` talks to a Workload API as any workload would
//! (through the `spiffe` crate's client), and the join token is moved off the command line
//! before the agent starts.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Subcommand};
use futures::StreamExt;
use meshid_agent::config::DEFAULT_SOCKET;

#[derive(Args, Debug, Clone)]
pub struct Sock {
    /// The Workload API socket [default: SPIFFE_ENDPOINT_SOCKET if set (unix:///path), else
    /// /run/meshid/agent/api.sock].
    #[arg(long, short = 's')]
    socket: Option<PathBuf>,
    /// Give up after this long.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    timeout: Duration,
}

#[derive(Subcommand, Debug)]
pub enum ApiCommand {
    /// Fetch SVIDs or bundles once.
    #[command(subcommand)]
    Fetch(FetchCommand),
    /// Print every X.509 update until interrupted.
    Watch {
        #[command(flatten)]
        sock: Sock,
    },
}

#[derive(Subcommand, Debug)]
pub enum FetchCommand {
    /// X.509-SVIDs (optionally written as PEM files to a directory).
    X509 {
        #[command(flatten)]
        sock: Sock,
        /// Write svid.N.pem, svid.N.key (mode 0600) and bundle.N.pem here.
        #[arg(long)]
        write: Option<PathBuf>,
    },
    /// A JWT-SVID.
    Jwt {
        #[command(flatten)]
        sock: Sock,
        /// Audience (repeatable).
        #[arg(long = "audience", required = true)]
        audience: Vec<String>,
        /// Only this identity.
        #[arg(long)]
        spiffe_id: Option<String>,
    },
    /// X.509 bundles.
    Bundle {
        #[command(flatten)]
        sock: Sock,
    },
}

/// The Workload API endpoint: `-s PATH`, else `SPIFFE_ENDPOINT_SOCKET` (as SPIFFE clients read
/// it: `unix:///path` or `unix:/path`), else the default socket.
fn endpoint(flag: Option<&std::path::Path>, env: Option<String>) -> anyhow::Result<String> {
    if let Some(path) = flag {
        return Ok(format!("unix://{}", path.display()));
    }
    match env.filter(|e| !e.is_empty()) {
        None => Ok(format!("unix://{DEFAULT_SOCKET}")),
        Some(e) => {
            let path = e
                .strip_prefix("unix://")
                .or_else(|| e.strip_prefix("unix:"))
                .filter(|p| p.starts_with('/'))
                .ok_or_else(|| {
                    anyhow::anyhow!(
                        "SPIFFE_ENDPOINT_SOCKET={e:?} is not unix:///absolute/path (or pass -s PATH)"
                    )
                })?;
            Ok(format!("unix://{path}"))
        }
    }
}

async fn client(sock: &Sock) -> anyhow::Result<spiffe::WorkloadApiClient> {
    let endpoint = endpoint(
        sock.socket.as_deref(),
        std::env::var("SPIFFE_ENDPOINT_SOCKET").ok(),
    )?;
    let c = tokio::time::timeout(
        sock.timeout,
        spiffe::WorkloadApiClient::connect_to(&endpoint),
    )
    .await
    .context("timed out connecting to the Workload API")??;
    Ok(c)
}

fn pem(label: &str, ders: &[&[u8]]) -> String {
    meshid_api::files::pem(label, ders.iter().copied())
}

/// `meshid-agent api ...`.
pub async fn api(cmd: ApiCommand) -> anyhow::Result<()> {
    match cmd {
        ApiCommand::Fetch(FetchCommand::X509 { sock, write }) => {
            let c = client(&sock).await?;
            let ctx = tokio::time::timeout(sock.timeout, c.fetch_x509_context())
                .await
                .context("timed out")??;
            for (n, svid) in ctx.svids().iter().enumerate() {
                let leaf = svid.leaf();
                println!("SPIFFE ID: {}", svid.spiffe_id());
                if let Some(h) = svid.hint() {
                    println!("Hint: {h}");
                }
                let (_, cert) = x509_parser::parse_x509_certificate(leaf.as_ref())
                    .context("leaf does not parse")?;
                println!("Serial: {}", cert.raw_serial_as_string());
                println!("Valid until: {}", cert.validity().not_after);
                println!("Chain length: {}", svid.cert_chain().len());
                if let Some(dir) = &write {
                    std::fs::create_dir_all(dir)?;
                    let chain: Vec<&[u8]> = svid.cert_chain().iter().map(|c| c.as_ref()).collect();
                    meshid_agent::client::write_file(
                        &dir.join(format!("svid.{n}.pem")),
                        pem("CERTIFICATE", &chain).as_bytes(),
                        0o644,
                    )?;
                    // Built in a buffer sized up front and zeroized on drop: no copy of the key
                    // is left behind by a reallocation.
                    let key =
                        meshid_api::files::pem_secret("PRIVATE KEY", svid.private_key().as_ref());
                    meshid_agent::client::write_file(
                        &dir.join(format!("svid.{n}.key")),
                        key.as_bytes(),
                        0o600,
                    )?;
                    if let Some(b) = ctx.bundle_set().get(svid.spiffe_id().trust_domain()) {
                        let roots: Vec<&[u8]> =
                            b.authorities().iter().map(|c| c.as_ref()).collect();
                        meshid_agent::client::write_file(
                            &dir.join(format!("bundle.{n}.pem")),
                            pem("CERTIFICATE", &roots).as_bytes(),
                            0o644,
                        )?;
                    }
                    println!(
                        "Wrote svid.{n}.pem, svid.{n}.key and bundle.{n}.pem to {}",
                        dir.display()
                    );
                }
                println!();
            }
        }
        ApiCommand::Fetch(FetchCommand::Jwt {
            sock,
            audience,
            spiffe_id,
        }) => {
            let c = client(&sock).await?;
            let id = spiffe_id.map(spiffe::SpiffeId::new).transpose()?;
            let token =
                tokio::time::timeout(sock.timeout, c.fetch_jwt_token(&audience, id.as_ref()))
                    .await
                    .context("timed out")??;
            println!("{token}");
        }
        ApiCommand::Fetch(FetchCommand::Bundle { sock }) => {
            let c = client(&sock).await?;
            let set = tokio::time::timeout(sock.timeout, c.fetch_x509_bundles())
                .await
                .context("timed out")??;
            for (td, b) in set.iter() {
                println!("# {td}");
                let roots: Vec<&[u8]> = b.authorities().iter().map(|c| c.as_ref()).collect();
                print!("{}", pem("CERTIFICATE", &roots));
            }
        }
        ApiCommand::Watch { sock } => {
            let c = client(&sock).await?;
            let mut stream = c.stream_x509_contexts().await?;
            while let Some(update) = stream.next().await {
                let ctx = update?;
                for svid in ctx.svids() {
                    let (_, cert) = x509_parser::parse_x509_certificate(svid.leaf().as_ref())
                        .context("leaf does not parse")?;
                    println!(
                        "{} serial={} not_after={}",
                        svid.spiffe_id(),
                        cert.raw_serial_as_string(),
                        cert.validity().not_after
                    );
                }
            }
        }
    }
    Ok(())
}

/// Moves a join token given on the command line off it: runs this program again (same pid,
/// through exec) with `--join-token -` and the token on a pipe as standard input, so that the
/// token is not left in /proc/PID/cmdline for every local user to read. Returns only if the
/// token was not on the command line, or if exec failed (then the token stays where it is).
pub fn move_join_token_off_argv(join_token: Option<&str>) {
    use std::os::unix::process::CommandExt as _;
    let Some(token) = join_token.filter(|t| *t != "-") else {
        return;
    };
    let mut argv: Vec<std::ffi::OsString> = std::env::args_os().skip(1).collect();
    let mut moved = false;
    let mut i = 0;
    while i < argv.len() {
        if argv[i] == "--join-token" && i + 1 < argv.len() {
            argv[i + 1] = "-".into();
            moved = true;
            i += 1;
        } else if argv[i].to_string_lossy().starts_with("--join-token=") {
            argv[i] = "--join-token=-".into();
            moved = true;
        }
        i += 1;
    }
    let (Ok(exe), true) = (std::env::current_exe(), moved) else {
        return;
    };
    let Ok((reader, mut writer)) = std::io::pipe() else {
        return;
    };
    if std::io::Write::write_all(&mut writer, token.as_bytes()).is_err() {
        return;
    }
    drop(writer);
    let error = std::process::Command::new(exe)
        .args(argv)
        .stdin(reader)
        .exec();
    eprintln!("meshid-agent: could not move the join token off the command line: {error}");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoint_comes_from_the_flag_then_the_environment_then_the_default() {
        let p = std::path::Path::new("/tmp/a.sock");
        let env = Some("unix:///run/x.sock".to_owned());
        assert_eq!(
            endpoint(Some(p), env.clone()).unwrap(),
            "unix:///tmp/a.sock"
        );
        assert_eq!(endpoint(None, env).unwrap(), "unix:///run/x.sock");
        assert_eq!(
            endpoint(None, Some("unix:/run/y.sock".into())).unwrap(),
            "unix:///run/y.sock"
        );
        assert_eq!(
            endpoint(None, None).unwrap(),
            format!("unix://{DEFAULT_SOCKET}")
        );
        assert_eq!(
            endpoint(None, Some(String::new())).unwrap(),
            format!("unix://{DEFAULT_SOCKET}")
        );
        for bad in [
            "tcp://127.0.0.1:1",
            "/run/x.sock",
            "unix://relative.sock",
            "unix:",
        ] {
            let e = endpoint(None, Some(bad.into())).unwrap_err().to_string();
            assert!(e.contains("SPIFFE_ENDPOINT_SOCKET"), "{bad}: {e}");
        }
    }
}
