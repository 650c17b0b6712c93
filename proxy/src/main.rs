//! `meshid-proxy`: the mTLS sidecar (`run`) and the policy author's tools (`policy`).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use meshid_proxy::config::{Config, ConfigError};

mod cli;

use cli::iptables::IptablesCommand;
use cli::policy::PolicyCommand;

use meshid_api::config::EXIT_CONFIG;

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
    /// Policy tools: check, explain, who-can, test, diff, suggest.
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
        Command::Healthcheck { ops_address } => match meshid_api::ops::healthcheck(&ops_address) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("meshid-proxy: {e}");
                ExitCode::FAILURE
            }
        },
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
            return meshid_api::config::exit_refused(
                "meshid-proxy",
                &format!("invalid policy: {e}"),
            )
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
    meshid_api::config::exit_refused("meshid-proxy", e)
}
