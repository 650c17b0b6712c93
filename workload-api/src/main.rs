//! `meshid-agent`: the node agent (`run`) and operator commands against its Workload API.

// Printing results is what a CLI is for.
#![allow(clippy::print_stdout)]

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use futures::StreamExt;
use meshid_agent::config::{Config, ConfigError, RawConfig, DEFAULT_SOCKET};

const EXIT_CONFIG: u8 = 64;

#[derive(Parser, Debug)]
#[command(
    name = "meshid-agent",
    version,
    about = "meshid node agent and Workload API tools"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the agent.
    Run(RunArgs),
    /// Talk to a running agent's Workload API, as a workload would.
    #[command(subcommand)]
    Api(ApiCommand),
    /// Exit 0 if the agent is synchronized with the CA (GET /readyz).
    Healthcheck {
        /// The agent's ops listener.
        #[arg(long, default_value = "127.0.0.1:8082")]
        ops_address: String,
    },
}

#[derive(Args, Debug)]
struct RunArgs {
    /// TOML configuration file.
    #[arg(long, short)]
    config: Option<PathBuf>,
    /// Join token for the first attestation (from `meshid-ca token generate`), or `-` to read
    /// it from standard input. A token given here is moved off the command line at start (the
    /// agent runs itself again with the token on a pipe), so other users cannot read it in
    /// /proc. Tokens are base64url and may begin with `-`, which is taken as the value.
    #[arg(long, allow_hyphen_values = true)]
    join_token: Option<String>,
    /// Trust domain (overrides the file).
    #[arg(long)]
    trust_domain: Option<String>,
    /// CA node API address (overrides the file).
    #[arg(long)]
    server_address: Option<String>,
    /// Bootstrap trust bundle PEM (overrides the file).
    #[arg(long)]
    trust_bundle: Option<PathBuf>,
    /// Data directory (overrides the file).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Workload API socket (overrides the file).
    #[arg(long)]
    socket_path: Option<PathBuf>,
    /// Ops listener (overrides the file).
    #[arg(long)]
    ops_address: Option<String>,
    /// Check the configuration and exit.
    #[arg(long)]
    check: bool,
}

#[derive(Args, Debug, Clone)]
struct Sock {
    /// The Workload API socket [default: SPIFFE_ENDPOINT_SOCKET if set (unix:///path), else
    /// /run/meshid/agent/api.sock].
    #[arg(long, short = 's')]
    socket: Option<PathBuf>,
    /// Give up after this long.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    timeout: Duration,
}

#[derive(Subcommand, Debug)]
enum ApiCommand {
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
enum FetchCommand {
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

fn load_config(a: &RunArgs) -> Result<Config, ConfigError> {
    let mut raw = match &a.config {
        Some(p) => RawConfig::from_file(p)?,
        None => RawConfig::default(),
    };
    macro_rules! over {
        ($field:ident, $arg:expr) => {
            if let Some(v) = &$arg {
                raw.$field = Some(v.clone());
            }
        };
    }
    over!(trust_domain, a.trust_domain);
    over!(server_address, a.server_address);
    over!(trust_bundle_path, a.trust_bundle);
    over!(data_dir, a.data_dir);
    over!(socket_path, a.socket_path);
    over!(ops_address, a.ops_address);
    Config::try_from(raw)
}

async fn run(args: RunArgs) -> ExitCode {
    let config = match load_config(&args) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("meshid-agent: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    // A join token file others may read gives them this node's identity.
    if let Some(path) = &config.join_token_file {
        if let Err(e) = meshid_api::config::check_private(path, "join token file") {
            eprintln!("meshid-agent: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    }
    if args.check {
        eprintln!("meshid-agent: configuration is valid");
        return ExitCode::SUCCESS;
    }
    meshid_api::server::init_tracing(config.log_json, "info");
    match serve(config, args.join_token).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %format!("{e:#}"), "meshid-agent stopped");
            ExitCode::FAILURE
        }
    }
}

async fn serve(config: Config, join_token: Option<String>) -> anyhow::Result<()> {
    let token = match (join_token, &config.join_token_file) {
        (Some(t), _) if t == "-" => {
            let mut t = String::new();
            std::io::Read::read_to_string(&mut std::io::stdin(), &mut t)
                .context("cannot read the join token from standard input")?;
            Some(t.trim().to_owned()).filter(|t| !t.is_empty())
        }
        (Some(t), _) => Some(t),
        // A missing or empty file means no token: an agent that already holds its identity
        // (in the data directory) needs none, and one that does not says so when it attests.
        (None, Some(path)) => match std::fs::read_to_string(path) {
            Ok(t) if !t.trim().is_empty() => Some(t.trim().to_owned()),
            Ok(_) => None,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                tracing::info!(path = %path.display(), "no join token file; using the identity in the data directory");
                None
            }
            Err(e) => {
                return Err(e)
                    .with_context(|| format!("cannot read join token file {}", path.display()))
            }
        },
        (None, None) => None,
    };
    std::fs::create_dir_all(&config.data_dir)
        .with_context(|| format!("cannot create data directory {}", config.data_dir.display()))?;
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&config.data_dir, std::fs::Permissions::from_mode(0o700))?;
    }
    let (manager, snapshots) = meshid_agent::manager::Manager::new(&config, token);
    let socket =
        meshid_agent::server::bind_workload_socket(&config.socket_path).with_context(|| {
            format!(
                "cannot bind the Workload API socket {}",
                config.socket_path.display()
            )
        })?;
    let ops = tokio::net::TcpListener::bind(config.ops_address)
        .await
        .with_context(|| format!("cannot bind ops listener {}", config.ops_address))?;
    tracing::info!(
        trust_domain = %config.trust_domain,
        socket = %config.socket_path.display(),
        ops_address = %ops.local_addr()?,
        "starting meshid-agent"
    );
    meshid_agent::server::run(
        manager,
        snapshots,
        socket,
        config.api_limits.clone(),
        ops,
        meshid_api::server::shutdown_signal(),
    )
    .await
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
    meshid_agent::client::pem(label, &ders.iter().map(|d| d.to_vec()).collect::<Vec<_>>())
}

async fn api(cmd: ApiCommand) -> anyhow::Result<()> {
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
                    let key =
                        zeroize::Zeroizing::new(pem("PRIVATE KEY", &[svid.private_key().as_ref()]));
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

async fn healthcheck(addr: &str) -> anyhow::Result<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::time::timeout(Duration::from_secs(3), tokio::net::TcpStream::connect(addr))
        .await
        .context("timed out")??;
    s.write_all(b"GET /readyz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .await?;
    let mut buf = String::new();
    tokio::time::timeout(Duration::from_secs(3), s.read_to_string(&mut buf))
        .await
        .context("timed out")??;
    if buf.starts_with("HTTP/1.1 200") {
        println!("meshid-agent is ready");
        Ok(())
    } else {
        anyhow::bail!("not ready: {}", buf.lines().last().unwrap_or_default())
    }
}

/// Moves a join token given on the command line off it: runs this program again (same pid,
/// through exec) with `--join-token -` and the token on a pipe as standard input, so that the
/// token is not left in /proc/PID/cmdline for every local user to read. Returns only if the
/// token was not on the command line, or if exec failed (then the token stays where it is).
fn move_join_token_off_argv(cli: &Cli) {
    use std::os::unix::process::CommandExt as _;
    let Command::Run(args) = &cli.command else {
        return;
    };
    let Some(token) = args.join_token.as_deref().filter(|t| *t != "-") else {
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

fn main() -> ExitCode {
    let cli = Cli::parse();
    move_join_token_off_argv(&cli);
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("meshid-agent: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    rt.block_on(async {
        match cli.command {
            Command::Run(args) => run(args).await,
            Command::Api(cmd) => {
                meshid_api::server::init_tracing(false, "warn");
                match api(cmd).await {
                    Ok(()) => ExitCode::SUCCESS,
                    Err(e) => {
                        eprintln!("meshid-agent: {e:#}");
                        ExitCode::FAILURE
                    }
                }
            }
            Command::Healthcheck { ops_address } => match healthcheck(&ops_address).await {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("meshid-agent: {e:#}");
                    ExitCode::FAILURE
                }
            },
        }
    })
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
