//! `meshid-agent`: the node agent (`run`) and operator commands against its Workload API.

// Printing results is what a CLI is for.
#![allow(clippy::print_stdout)]

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use meshid_agent::config::{Config, ConfigError, RawConfig};

mod cli;

use cli::ApiCommand;

#[derive(Parser, Debug)]
#[command(
    name = "meshid-agent",
    version,
    about = "meshid node agent and Workload API tools"
)]
pub(crate) struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
pub(crate) enum Command {
    /// Run the agent.
    Run(RunArgs),
    /// Talk to a running agent's Workload API, as a workload would.
    #[command(subcommand)]
    Api(ApiCommand),
    /// Exit 0 if the agent is synchronized with the CA (GET /readyz).
    Healthcheck {
        /// The agent's ops listener.
        #[arg(long, default_value = meshid_agent::config::DEFAULT_OPS_ADDRESS)]
        ops_address: String,
    },
}

#[derive(Args, Debug)]
pub(crate) struct RunArgs {
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
        Err(e) => return meshid_api::config::exit_refused("meshid-agent", &e),
    };
    // A join token file others may read gives them this node's identity.
    if let Some(path) = &config.join_token_file {
        if let Err(e) = meshid_api::config::check_private(path, "join token file") {
            return meshid_api::config::exit_refused("meshid-agent", &e);
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
    // Created 0700 (never wider, even for a moment), or narrowed to it.
    meshid_api::files::ensure_private_dir(&config.data_dir)
        .with_context(|| format!("cannot create data directory {}", config.data_dir.display()))?;
    let (manager, snapshots) = meshid_agent::manager::Manager::new(&config, token);
    let socket = meshid_api::uds::bind(&config.socket_path, meshid_api::uds::Access::Everyone)
        .with_context(|| {
            format!(
                "cannot bind the Workload API socket {}",
                config.socket_path.display()
            )
        })?;
    let ops = tokio::net::TcpListener::bind(config.ops_address)
        .await
        .with_context(|| format!("cannot bind ops listener {}", config.ops_address))?;
    // Sized now: grown under load, each doubling would stall the agent for an RCU grace period.
    let descriptor_table =
        meshid_api::server::size_descriptor_table(config.api_limits.connections as u64);
    tracing::info!(
        trust_domain = %config.trust_domain,
        socket = %config.socket_path.display(),
        ops_address = %ops.local_addr()?,
        descriptor_table,
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

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Command::Run(args) = &cli.command {
        cli::move_join_token_off_argv(args.join_token.as_deref());
    }
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
                match cli::api(cmd).await {
                    Ok(()) => ExitCode::SUCCESS,
                    Err(e) => {
                        eprintln!("meshid-agent: {e:#}");
                        ExitCode::FAILURE
                    }
                }
            }
            Command::Healthcheck { ops_address } => {
                match tokio::task::spawn_blocking(move || {
                    meshid_api::ops::healthcheck(&ops_address)
                })
                .await
                {
                    Ok(Ok(())) => {
                        println!("meshid-agent is ready");
                        ExitCode::SUCCESS
                    }
                    Ok(Err(e)) => {
                        eprintln!("meshid-agent: {e}");
                        ExitCode::FAILURE
                    }
                    Err(e) => {
                        eprintln!("meshid-agent: {e}");
                        ExitCode::FAILURE
                    }
                }
            }
        }
    })
}
