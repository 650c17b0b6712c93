//! `meshid-proxy`: the mTLS sidecar (`run`) and the policy author's tools (`policy`).

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use meshid_proxy::policy_cli::PolicyCommand;

#[derive(Parser, Debug)]
#[command(name = "meshid-proxy", version, about = "meshid mTLS sidecar and policy tools")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Policy tools: check, explain, who-can, test, diff.
    #[command(subcommand)]
    Policy(PolicyCommand),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Policy(cmd) => meshid_proxy::policy_cli::run(cmd),
    }
}
