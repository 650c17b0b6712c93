//! `meshid-proxy policy ...`: the policy author's tools (placeholder, being written).

use std::process::ExitCode;

/// Policy tools.
#[derive(clap::Subcommand, Debug)]
pub enum PolicyCommand {
    /// Validate a policy file.
    Check {
        /// The policy file.
        file: std::path::PathBuf,
    },
}

/// Runs a policy command and returns the process exit code.
pub fn run(cmd: PolicyCommand) -> ExitCode {
    let _ = cmd;
    ExitCode::FAILURE
}
