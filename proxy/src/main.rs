//! `meshid-proxy`: the mTLS sidecar (`run`) and the policy author's tools (`policy`).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use meshid_proxy::config::{Config, ConfigError};

mod cli;

use cli::iptables::IptablesCommand;
use cli::policy::PolicyCommand;

/// Exit code of a usage or configuration error (EX_USAGE).
pub(crate) const EXIT_CONFIG: u8 = 64;

#[derive(Parser, Debug)]
#[command(
    name = "meshid-proxy",
    version,
    about = "meshid mTLS sidecar and policy tools"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the proxy.
    Run(RunArgs),
    /// Exit 0 if the proxy holds an SVID and serves (GET /readyz).
    Healthcheck {
        /// The proxy's ops listener.
        #[arg(long, default_value = meshid_proxy::config::DEFAULT_OPS_ADDRESS)]
        ops_address: String,
    },
    /// Policy tools: check, explain, who-can, test, diff.
    #[command(subcommand)]
    Policy(PolicyCommand),
    /// Transparent mode's iptables rules (run as root in the workload's network namespace).
    #[command(subcommand)]
    Iptables(IptablesCommand),
}

#[derive(Args, Debug)]
struct RunArgs {
    /// TOML configuration file.
    #[arg(long, short)]
    config: PathBuf,
    /// Check the configuration and the policy, then exit.
    #[arg(long)]
    check: bool,
}

fn main() -> ExitCode {
    // Usage errors exit 64 (EX_USAGE), not clap's 2, which `policy check` uses for "valid with
    // warnings".
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() {
                ExitCode::from(EXIT_CONFIG)
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    match cli.command {
        Command::Policy(cmd) => cli::policy::run(cmd),
        Command::Healthcheck { ops_address } => healthcheck(&ops_address),
        Command::Run(args) => run(args),
        Command::Iptables(cmd) => cli::iptables::run(cmd),
    }
}

fn run(args: RunArgs) -> ExitCode {
    let config = match Config::load(&args.config) {
        Ok(c) => c,
        Err(e) => return config_error(&e),
    };
    meshid_api::server::init_tracing(config.log_json, "info");
    let ports = meshid_proxy::policy::port_protocols(&config);
    let policy = match meshid_proxy::policy::load_policy(config.policy_file.as_deref(), &ports) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("meshid-proxy: invalid policy: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    if args.check {
        eprintln!("meshid-proxy: configuration and policy are valid");
        return ExitCode::SUCCESS;
    }
    let mut builder = if config.worker_threads == 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut b = tokio::runtime::Builder::new_multi_thread();
        b.worker_threads(config.worker_threads);
        b
    };
    // Blocking work is rare (the access log writer, DNS): keep that pool small.
    let runtime = match builder.enable_all().max_blocking_threads(4).build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("meshid-proxy: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async move {
        let bound = meshid_proxy::server::bind(&config).await?;
        meshid_proxy::server::run(config, policy, bound, meshid_api::server::shutdown_signal())
            .await
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "meshid-proxy failed");
            eprintln!("meshid-proxy: {e:#}");
            ExitCode::FAILURE
        }
    }
}

pub(crate) fn config_error(e: &ConfigError) -> ExitCode {
    eprintln!("meshid-proxy: {e}");
    ExitCode::from(EXIT_CONFIG)
}

fn healthcheck(addr: &str) -> ExitCode {
    use std::io::{Read, Write};
    let attempt = || -> std::io::Result<bool> {
        let mut s = std::net::TcpStream::connect(addr)?;
        s.set_read_timeout(Some(std::time::Duration::from_secs(5)))?;
        write!(
            s,
            "GET /readyz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
        )?;
        let mut buf = String::new();
        s.read_to_string(&mut buf)?;
        Ok(buf.starts_with("HTTP/1.1 200"))
    };
    match attempt() {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => {
            eprintln!("meshid-proxy: not ready");
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("meshid-proxy: cannot reach {addr}: {e}");
            ExitCode::FAILURE
        }
    }
}
