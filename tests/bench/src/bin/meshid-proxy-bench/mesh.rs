//! meshid: a CA and an agent from the harness, and the meshid-proxy binary.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use meshid_tests::{Agent, Ca};

use crate::cli::*;
use crate::measure::*;
use meshid_bench::procs::*;

/// The meshid control plane shared by the meshid rows.
pub(crate) struct Mesh {
    // Drops in order: the agent before the CA.
    pub(crate) agent: Agent,
    pub(crate) _ca: Ca,
    pub(crate) proxy: PathBuf,
}

/// Builds meshid-proxy next to the harness's binaries (unless `MESHID_NO_BUILD` is set) and
/// checks that it has the `run` subcommand.
pub(crate) fn meshid_proxy_bin() -> Result<PathBuf, String> {
    let dir = meshid_tests::bin_dir();
    if std::env::var_os("MESHID_NO_BUILD").is_none() {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut cmd = Command::new(cargo);
        cmd.args(["build", "--quiet", "-p", "meshid-proxy", "--bins"]);
        if dir.ends_with("release") {
            cmd.arg("--release");
        }
        let status = cmd
            .current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
            .status()
            .map_err(|e| format!("run cargo build: {e}"))?;
        if !status.success() {
            return Err("cargo build -p meshid-proxy failed".into());
        }
    }
    let bin = dir.join("meshid-proxy");
    let out = Command::new(&bin)
        .args(["run", "--help"])
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("{}: {e}", bin.display()))?;
    if !out.status.success() {
        return Err(format!(
            "`{} run --help` failed (no `run` subcommand yet?): {}",
            bin.display(),
            String::from_utf8_lossy(&out.stderr)
                .lines()
                .take(3)
                .collect::<Vec<_>>()
                .join(" / ")
        ));
    }
    Ok(bin)
}

impl Mesh {
    pub(crate) fn start(dir: &Path) -> Result<Mesh, String> {
        let proxy = meshid_proxy_bin()?;
        std::fs::create_dir_all(dir).unwrap();
        let ca = Ca::start(dir, &[]);
        register_pid(ca.proc.id());
        let (secret, agent_id) = ca.join_token();
        ca.ok(&[
            "entry",
            "create",
            "--id",
            "bench",
            "--spiffe-id",
            BENCH_ID,
            "--parent-id",
            &agent_id,
            "--selector",
            &format!("unix:uid:{}", uid()),
        ]);
        let agent = Agent::start(dir, &ca, &secret);
        register_pid(agent.proc.id());
        Ok(Mesh {
            agent,
            _ca: ca,
            proxy,
        })
    }
}
