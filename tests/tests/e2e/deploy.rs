//! The deployment files, checked so that they cannot rot: the systemd units in
//! `deploy/systemd` and the Kubernetes manifests in `deploy/kubernetes`.
//!
//! - systemd: `systemd-analyze verify` on every unit (with the real binaries in place of
//!   `/usr/bin`), its offline security score, a table of the hardening directives each unit
//!   must keep, the sysusers.d and tmpfiles.d files applied to a scratch root, and the example
//!   configurations the units point at, through the binaries' own `--check`.
//! - Kubernetes: every manifest parsed (PyYAML), then cross-checked (references between
//!   objects, probes, resources, security contexts, Service selectors, the paths and ports the
//!   embedded configurations use) — always, since schemas cannot see dangling references —
//!   and validated against the Kubernetes JSON schemas with `kubernetes-validate --strict`
//!   when it is installed (in CI it must be). The configurations embedded in ConfigMaps go
//!   through `--check`, and the init containers' scripts are run on a scratch directory.
//!
//! Optional tools that are missing are reported on stdout as SKIPPED, never silently passed
//! over: systemd-analyze, systemd-sysusers and systemd-tmpfiles (Debian's `systemd`), kubectl
//! (`kubectl kustomize`), and `kubernetes-validate` (`python3 -m pip install
//! kubernetes-validate`). When `MESHID_CI` is set (`.ci/run` sets it), a missing
//! systemd-analyze or kubernetes-validate is a failure. python3 with PyYAML is required:
//! without it the manifests cannot be read at all.

#![allow(clippy::print_stdout)]

use std::collections::BTreeSet;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

fn deploy(rel: &str) -> PathBuf {
    repo().join("deploy").join(rel)
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

fn bin(name: &str) -> PathBuf {
    meshid_tests::bin_dir().join(name)
}

/// Whether `cmd args` runs and exits 0.
fn tool_works(cmd: &str, args: &[&str]) -> bool {
    Command::new(cmd)
        .args(args)
        .output()
        .is_ok_and(|o| o.status.success())
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path)
        .unwrap_or_else(|e| panic!("stat {}: {e}", path.display()))
        .permissions()
        .mode()
        & 0o7777
}

/// The value of `key` in `section` ("" for the top level) of a TOML document (the `toml`
/// crate reads it): a string's contents, or the TOML text of anything else.
fn toml_get(text: &str, section: &str, key: &str) -> Option<String> {
    let doc: toml::Table = text.parse().unwrap();
    let table = if section.is_empty() {
        &doc
    } else {
        doc.get(section)?.as_table()?
    };
    Some(match table.get(key)? {
        toml::Value::String(s) => s.clone(),
        other => other.to_string(),
    })
}

fn port_of(addr: &str) -> u16 {
    addr.rsplit_once(':').unwrap().1.parse().unwrap()
}

/// Runs `bin args` and returns (exit code, output).
fn run(bin_name: &str, args: &[&str]) -> (i32, String) {
    let out = Command::new(bin(bin_name)).args(args).output().unwrap();
    (out.status.code().unwrap_or(-1), text(&out))
}

/// `meshid-proxy run --check` on `proxy_toml`, with its policy file taken from `policy`.
fn check_proxy_config(dir: &Path, proxy_toml: &str, policy: &Path) -> (i32, String) {
    let policy_file = toml_get(proxy_toml, "", "policy_file").unwrap();
    let path = dir.join("proxy.toml");
    std::fs::write(
        &path,
        proxy_toml.replace(&policy_file, &policy.display().to_string()),
    )
    .unwrap();
    run(
        "meshid-proxy",
        &["run", "--config", path.to_str().unwrap(), "--check"],
    )
}

mod kubernetes;
mod prometheus;
mod systemd;
