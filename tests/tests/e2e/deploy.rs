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

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::print_stdout
)]

use std::collections::{BTreeMap, BTreeSet};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;

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

// ---------------------------------------------------------------------------------------------
// TOML, just enough: `key = "string"`, `key = number` and `[section]` lines.

/// The value of `key` in `section` ("" for the top level): a string's contents, or the raw
/// text of anything else.
fn toml_get(text: &str, section: &str, key: &str) -> Option<String> {
    let mut current = String::new();
    for line in text.lines() {
        let line = line.trim();
        if line.starts_with('#') || line.is_empty() {
            continue;
        }
        if let Some(name) = line.strip_prefix('[') {
            current = name.trim_end_matches(']').trim_matches('[').to_owned();
            continue;
        }
        let Some((k, v)) = line.split_once('=') else {
            continue;
        };
        if current == section && k.trim() == key {
            let v = v.trim();
            return Some(match v.strip_prefix('"') {
                Some(rest) => rest[..rest.find('"').unwrap()].to_owned(),
                None => v.split('#').next().unwrap().trim().to_owned(),
            });
        }
    }
    None
}

fn port_of(addr: &str) -> u16 {
    addr.rsplit_once(':').unwrap().1.parse().unwrap()
}

// ---------------------------------------------------------------------------------------------
// systemd

/// The units, the example configuration each one runs with (as installed, and in deploy/),
/// and the most exposure `systemd-analyze security` may report (its scale: 0-100).
const UNITS: &[(&str, &str, &str, u32)] = &[
    ("meshid-ca.service", "/etc/meshid/ca.toml", "ca.toml", 15),
    // CAP_SYS_PTRACE and full /proc visibility, for workload attestation.
    (
        "meshid-agent.service",
        "/etc/meshid/agent.toml",
        "agent.toml",
        20,
    ),
    (
        "meshid-proxy@.service",
        "/etc/meshid/proxy/%i.toml",
        "proxy.toml",
        15,
    ),
];

/// `(section, key, value)` of a unit file or drop-in, continuation lines joined.
fn unit_entries(text: &str) -> Vec<(String, String, String)> {
    let mut out = Vec::new();
    let mut section = String::new();
    let mut pending = String::new();
    for raw in text.lines() {
        let line = raw.trim();
        if pending.is_empty() && (line.starts_with('#') || line.starts_with(';')) {
            continue;
        }
        if let Some(cont) = line.strip_suffix('\\') {
            pending.push_str(cont);
            pending.push(' ');
            continue;
        }
        let line = format!("{pending}{line}");
        pending.clear();
        if line.is_empty() {
            continue;
        }
        if line.starts_with('[') {
            section = line.trim_matches(|c| c == '[' || c == ']').to_owned();
            continue;
        }
        let (k, v) = line
            .split_once('=')
            .unwrap_or_else(|| panic!("not key=value: {line}"));
        out.push((section.clone(), k.trim().to_owned(), v.trim().to_owned()));
    }
    out
}

/// Every value of `key` in the `[Service]` section.
fn service_values(entries: &[(String, String, String)], key: &str) -> Vec<String> {
    entries
        .iter()
        .filter(|(s, k, _)| s == "Service" && k == key)
        .map(|(_, _, v)| v.clone())
        .collect()
}

/// The last value of `key` (as systemd reads it), if any.
fn service_value(entries: &[(String, String, String)], key: &str) -> Option<String> {
    service_values(entries, key).pop()
}

/// Directives every unit must carry, with their exact value.
const HARDENING: &[(&str, &str)] = &[
    ("Type", "exec"),
    ("NoNewPrivileges", "yes"),
    ("ProtectSystem", "strict"),
    ("PrivateTmp", "yes"),
    ("PrivateDevices", "yes"),
    ("DevicePolicy", "closed"),
    ("PrivateIPC", "yes"),
    ("PrivateMounts", "yes"),
    ("ProtectKernelTunables", "yes"),
    ("ProtectKernelModules", "yes"),
    ("ProtectKernelLogs", "yes"),
    ("ProtectControlGroups", "yes"),
    ("ProtectClock", "yes"),
    ("ProtectHostname", "yes"),
    ("RestrictNamespaces", "yes"),
    ("RestrictRealtime", "yes"),
    ("RestrictSUIDSGID", "yes"),
    ("RemoveIPC", "yes"),
    ("LockPersonality", "yes"),
    ("MemoryDenyWriteExecute", "yes"),
    ("RestrictAddressFamilies", "AF_UNIX AF_INET AF_INET6"),
    ("SystemCallArchitectures", "native"),
    ("SystemCallErrorNumber", "EPERM"),
    ("RestartPreventExitStatus", "64"),
];

/// Per unit: directives with their exact value ("" = present and empty).
fn unit_specific(unit: &str) -> Vec<(&'static str, &'static str)> {
    match unit {
        "meshid-ca.service" => vec![
            ("User", "meshid-ca"),
            ("Group", "meshid-ca"),
            (
                "ExecStart",
                "/usr/bin/meshid-ca run --config /etc/meshid/ca.toml",
            ),
            ("CapabilityBoundingSet", ""),
            ("AmbientCapabilities", ""),
            ("StateDirectory", "meshid/ca"),
            ("StateDirectoryMode", "0700"),
            ("UMask", "0077"),
            ("ProtectHome", "yes"),
            ("PrivateUsers", "yes"),
            ("ProtectProc", "invisible"),
            ("ProcSubset", "pid"),
        ],
        "meshid-agent.service" => vec![
            ("User", "meshid-agent"),
            ("Group", "meshid-agent"),
            (
                "ExecStart",
                "/usr/bin/meshid-agent run --config /etc/meshid/agent.toml",
            ),
            // Only for the kernel's ptrace access check on /proc/<pid>/exe.
            ("CapabilityBoundingSet", "CAP_SYS_PTRACE"),
            ("AmbientCapabilities", "CAP_SYS_PTRACE"),
            ("StateDirectory", "meshid/agent"),
            ("StateDirectoryMode", "0700"),
            ("RuntimeDirectory", "meshid/agent"),
            ("RuntimeDirectoryMode", "0755"),
            ("RuntimeDirectoryPreserve", "yes"),
            ("UMask", "0077"),
            ("ProtectHome", "read-only"),
            // Callers are other users' processes: they must stay visible in /proc.
            ("ProtectProc", "default"),
            ("ProcSubset", "all"),
        ],
        "meshid-proxy@.service" => vec![
            ("User", "meshid-proxy"),
            ("Group", "meshid-proxy"),
            (
                "ExecStart",
                "/usr/bin/meshid-proxy run --config /etc/meshid/proxy/%i.toml",
            ),
            (
                "ExecStartPre",
                "/usr/bin/meshid-proxy run --config /etc/meshid/proxy/%i.toml --check",
            ),
            ("ExecReload", "/bin/kill -HUP $MAINPID"),
            ("CapabilityBoundingSet", ""),
            ("AmbientCapabilities", ""),
            ("LogsDirectory", "meshid"),
            ("UMask", "0027"),
            ("ProtectHome", "yes"),
            ("PrivateUsers", "yes"),
            ("ProtectProc", "invisible"),
            ("ProcSubset", "pid"),
        ],
        other => panic!("no table for {other}"),
    }
}

#[test]
fn systemd_units_keep_their_hardening() {
    let mut errors = Vec::new();
    for (unit, _, _, _) in UNITS {
        let entries = unit_entries(&read(&deploy(&format!("systemd/{unit}"))));
        for (key, want) in HARDENING.iter().copied().chain(unit_specific(unit)) {
            match service_value(&entries, key) {
                Some(v) if v == want => {}
                other => errors.push(format!("{unit}: {key}={want} expected, found {other:?}")),
            }
        }
        let filters = service_values(&entries, "SystemCallFilter");
        if filters.first().map(String::as_str) != Some("@system-service")
            || !filters.iter().any(|f| f == "~@privileged @resources")
        {
            errors.push(format!(
                "{unit}: SystemCallFilter=@system-service then ~@privileged @resources expected, found {filters:?}"
            ));
        }
        if unit.contains("agent") && service_value(&entries, "PrivateUsers").is_some() {
            errors.push(format!(
                "{unit}: PrivateUsers= would turn every caller's uid into 65534"
            ));
        }
        let wanted_by: Vec<_> = entries
            .iter()
            .filter(|(s, k, _)| s == "Install" && k == "WantedBy")
            .collect();
        if wanted_by.len() != 1 || wanted_by[0].2 != "multi-user.target" {
            errors.push(format!(
                "{unit}: WantedBy=multi-user.target expected, found {wanted_by:?}"
            ));
        }
    }

    // Transparent mode: the iptables rules are installed and removed as root (`+`).
    let dropin = unit_entries(&read(&deploy("systemd/proxy-transparent.conf")));
    let pre = service_values(&dropin, "ExecStartPre");
    if !(pre.len() == 1
        && pre[0].starts_with('+')
        && pre[0].contains("meshid-proxy iptables install --config /etc/meshid/proxy/%i.toml")
        && pre[0].contains("--proxy-uid \"$$(id -u meshid-proxy)\""))
    {
        errors.push(format!(
            "proxy-transparent.conf: ExecStartPre=+... iptables install --proxy-uid expected, found {pre:?}"
        ));
    }
    let post = service_values(&dropin, "ExecStopPost");
    if post != ["+/usr/bin/meshid-proxy iptables uninstall"] {
        errors.push(format!(
            "proxy-transparent.conf: ExecStopPost=+... iptables uninstall expected, found {post:?}"
        ));
    }

    // The example configurations keep their data where the units make it writable.
    let ca = read(&deploy("ca.toml"));
    let agent = read(&deploy("agent.toml"));
    let proxy = read(&deploy("proxy.toml"));
    let checks = [
        (
            "ca.toml data_dir",
            toml_get(&ca, "", "data_dir"),
            "/var/lib/meshid/ca",
        ),
        (
            "ca.toml admin_socket",
            toml_get(&ca, "", "admin_socket"),
            "/var/lib/meshid/ca/admin.sock",
        ),
        (
            "agent.toml data_dir",
            toml_get(&agent, "", "data_dir"),
            "/var/lib/meshid/agent",
        ),
        (
            "agent.toml socket_path",
            toml_get(&agent, "", "socket_path"),
            "/run/meshid/agent/api.sock",
        ),
        (
            "proxy.toml workload_api_socket",
            toml_get(&proxy, "", "workload_api_socket"),
            "unix:///run/meshid/agent/api.sock",
        ),
    ];
    for (what, got, want) in checks {
        if got.as_deref() != Some(want) {
            errors.push(format!(
                "deploy/{what}: {want} expected (the units' directories), found {got:?}"
            ));
        }
    }
    if let Some(log) = toml_get(&proxy, "", "access_log") {
        if log.starts_with('/') && !log.starts_with("/var/log/meshid/") {
            errors.push(format!(
                "deploy/proxy.toml access_log {log} is outside LogsDirectory=meshid"
            ));
        }
    }

    // sysusers.d defines every User=, tmpfiles.d every directory with its mode and owner.
    let sysusers = read(&deploy("systemd/meshid.sysusers.conf"));
    let users: BTreeSet<&str> = sysusers
        .lines()
        .filter(|l| l.starts_with("u "))
        .filter_map(|l| l.split_whitespace().nth(1))
        .collect();
    for (unit, _, _, _) in UNITS {
        let entries = unit_entries(&read(&deploy(&format!("systemd/{unit}"))));
        let user = service_value(&entries, "User").unwrap_or_default();
        if !users.contains(user.as_str()) {
            errors.push(format!(
                "{unit}: User={user} is not in meshid.sysusers.conf"
            ));
        }
    }
    let tmpfiles = read(&deploy("systemd/meshid.tmpfiles.conf"));
    let dirs: BTreeMap<&str, (&str, &str)> = tmpfiles
        .lines()
        .filter(|l| l.starts_with("d "))
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f[1], (f[2], f[3]))
        })
        .collect();
    for (dir, want) in [
        ("/run/meshid/agent", ("0755", "meshid-agent")),
        ("/var/lib/meshid/ca", ("0700", "meshid-ca")),
        ("/var/lib/meshid/agent", ("0700", "meshid-agent")),
        ("/var/log/meshid", ("0750", "meshid-proxy")),
    ] {
        if dirs.get(dir) != Some(&want) {
            errors.push(format!(
                "meshid.tmpfiles.conf: {dir} {want:?} expected, found {:?}",
                dirs.get(dir)
            ));
        }
    }
    assert!(errors.is_empty(), "{}", errors.join("\n"));
}

/// Copies the units (and the transparent drop-in for instance `web`) into `dir`, with the
/// built binaries in place of /usr/bin; returns the paths to verify.
fn stage_units(dir: &Path) -> Vec<PathBuf> {
    let rewrite = |text: &str| {
        text.replace(
            "/usr/bin/meshid-",
            &format!("{}/meshid-", meshid_tests::bin_dir().display()),
        )
    };
    for (unit, _, _, _) in UNITS {
        let text = read(&deploy(&format!("systemd/{unit}")));
        std::fs::write(dir.join(unit), rewrite(&text)).unwrap();
    }
    let dropins = dir.join("meshid-proxy@web.service.d");
    std::fs::create_dir(&dropins).unwrap();
    std::fs::write(
        dropins.join("transparent.conf"),
        rewrite(&read(&deploy("systemd/proxy-transparent.conf"))),
    )
    .unwrap();
    [
        "meshid-ca.service",
        "meshid-agent.service",
        "meshid-proxy@web.service",
    ]
    .iter()
    .map(|u| dir.join(u))
    .collect()
}

/// What `systemd-analyze verify` says about `units` that concerns them (it only warns about
/// unknown or malformed directives, with exit status 0, so its output is the verdict).
fn verify_complaints(dir: &Path, units: &[PathBuf]) -> Vec<String> {
    let out = Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .args(units)
        .output()
        .unwrap();
    let all = text(&out);
    let mut complaints: Vec<String> = all
        .lines()
        .filter(|l| l.contains(&*dir.to_string_lossy()) || l.contains("meshid"))
        .map(str::to_owned)
        .collect();
    if !out.status.success() && complaints.is_empty() {
        complaints.push(format!("systemd-analyze verify failed: {all}"));
    }
    complaints
}

#[test]
fn systemd_units_pass_systemd_analyze() {
    if !tool_works("systemd-analyze", &["--version"]) {
        let msg = "SKIPPED systemd-analyze verify: systemd-analyze is not installed (Debian: apt-get install systemd)";
        assert!(
            std::env::var_os("MESHID_CI").is_none(),
            "{msg}; CI must run it"
        );
        println!("{msg}");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let units = stage_units(dir.path());
    let complaints = verify_complaints(dir.path(), &units);
    assert!(
        complaints.is_empty(),
        "systemd-analyze verify:\n{}",
        complaints.join("\n")
    );

    // The check is meaningful here: a misspelled directive and a bad value are reported.
    let ca = dir.path().join("meshid-ca.service");
    let good = read(&ca);
    for (from, to, marker) in [
        ("ProtectClock=yes", "ProtectClok=yes", "ProtectClok"),
        ("RestrictSUIDSGID=yes", "RestrictSUIDSGID=maybe", "maybe"),
    ] {
        std::fs::write(&ca, good.replacen(from, to, 1)).unwrap();
        let complaints = verify_complaints(dir.path(), std::slice::from_ref(&ca));
        assert!(
            complaints.iter().any(|c| c.contains(marker)),
            "systemd-analyze verify did not notice {to}: {complaints:?}"
        );
    }
    std::fs::write(&ca, good).unwrap();

    // The offline exposure score (systemd 250 and later).
    if !tool_works("systemd-analyze", &["security", "--offline=yes", "--help"]) {
        println!("SKIPPED systemd-analyze security: this systemd has no --offline");
    } else {
        for ((unit, _, _, max), path) in UNITS.iter().zip(&units) {
            let out = Command::new("systemd-analyze")
                .args(["security", "--offline=yes", "--no-pager"])
                .arg(format!("--threshold={max}"))
                .arg(path)
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "{unit}: exposure above {max}/100:\n{}",
                text(&out)
            );
        }
    }
    println!(
        "systemd-analyze verify and security: {} units OK",
        units.len()
    );
}

#[test]
fn systemd_users_and_directories_apply_to_a_scratch_root() {
    if !tool_works("systemd-sysusers", &["--version"])
        || !tool_works("systemd-tmpfiles", &["--version"])
    {
        println!(
            "SKIPPED sysusers.d/tmpfiles.d: systemd-sysusers or systemd-tmpfiles is not installed"
        );
        return;
    }
    if !is_root() {
        println!("SKIPPED sysusers.d/tmpfiles.d: needs root (tmpfiles sets owners)");
        return;
    }
    let root = tempfile::tempdir().unwrap();
    std::fs::create_dir(root.path().join("etc")).unwrap();
    let root_arg = format!("--root={}", root.path().display());
    let out = Command::new("systemd-sysusers")
        .arg(&root_arg)
        .arg(deploy("systemd/meshid.sysusers.conf"))
        .output()
        .unwrap();
    assert!(out.status.success(), "systemd-sysusers: {}", text(&out));
    let passwd = read(&root.path().join("etc/passwd"));
    let uid = |user: &str| -> u32 {
        passwd
            .lines()
            .find(|l| l.starts_with(&format!("{user}:")))
            .and_then(|l| l.split(':').nth(2))
            .unwrap_or_else(|| panic!("{user} not created:\n{passwd}"))
            .parse()
            .unwrap()
    };
    let out = Command::new("systemd-tmpfiles")
        .arg(&root_arg)
        .arg("--create")
        .arg(deploy("systemd/meshid.tmpfiles.conf"))
        .output()
        .unwrap();
    assert!(out.status.success(), "systemd-tmpfiles: {}", text(&out));
    for (dir, want_mode, user) in [
        ("run/meshid", 0o755, None),
        ("run/meshid/agent", 0o755, Some("meshid-agent")),
        ("var/lib/meshid/ca", 0o700, Some("meshid-ca")),
        ("var/lib/meshid/agent", 0o700, Some("meshid-agent")),
        ("var/log/meshid", 0o750, Some("meshid-proxy")),
    ] {
        let path = root.path().join(dir);
        assert_eq!(mode(&path), want_mode, "/{dir}");
        let owner = std::fs::metadata(&path).unwrap().uid();
        assert_eq!(owner, user.map_or(0, uid), "/{dir} owner");
    }
    println!("sysusers.d and tmpfiles.d: applied to a scratch root, modes and owners OK");
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

#[test]
fn systemd_example_configs_pass_check() {
    // The files the units run with, as installed from deploy/ (see each unit's comments).
    for (unit, installed, example, _) in UNITS {
        let entries = unit_entries(&read(&deploy(&format!("systemd/{unit}"))));
        let exec = service_value(&entries, "ExecStart").unwrap();
        assert!(
            exec.ends_with(&format!("--config {installed}")),
            "{unit}: {exec}"
        );
        let path = deploy(example);
        let (code, out) = match *example {
            "ca.toml" => run(
                "meshid-ca",
                &["run", "--config", path.to_str().unwrap(), "--check"],
            ),
            "agent.toml" => run(
                "meshid-agent",
                &["run", "--config", path.to_str().unwrap(), "--check"],
            ),
            _ => {
                let dir = tempfile::tempdir().unwrap();
                check_proxy_config(dir.path(), &read(&path), &deploy("policy.yaml"))
            }
        };
        assert_eq!(code, 0, "deploy/{example} (for {unit}): {out}");
    }
    let (code, out) = run(
        "meshid-proxy",
        &["policy", "check", deploy("policy.yaml").to_str().unwrap()],
    );
    assert_eq!(code, 0, "deploy/policy.yaml: {out}");
}

// ---------------------------------------------------------------------------------------------
// Kubernetes

const K8S_NAMESPACE: &str = "meshid";

/// One object of a manifest.
#[derive(Clone, Debug)]
struct Obj {
    file: String,
    kind: String,
    name: String,
    v: Value,
}

impl Obj {
    fn id(&self) -> String {
        format!("{}/{} ({})", self.kind, self.name, self.file)
    }
}

/// Whether python3 with PyYAML is there (the manifests cannot be read without it).
fn have_pyyaml() -> bool {
    tool_works("python3", &["-c", "import yaml"])
}

/// Every YAML file of deploy/kubernetes, parsed: file name → documents.
fn load_k8s() -> BTreeMap<String, Vec<Value>> {
    assert!(
        have_pyyaml(),
        "python3 with PyYAML is needed to read the Kubernetes manifests: python3 -m pip install kubernetes-validate (brings PyYAML) or apt-get install python3-yaml"
    );
    let dir = deploy("kubernetes");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml" || e == "yml"))
        .collect();
    files.sort();
    let script = "import json, sys, yaml\n\
                  out = {}\n\
                  for p in sys.argv[1:]:\n    \
                      with open(p) as f:\n        \
                          out[p] = [d for d in yaml.safe_load_all(f) if d is not None]\n\
                  json.dump(out, sys.stdout)\n";
    let out = Command::new("python3")
        .arg("-c")
        .arg(script)
        .args(&files)
        .output()
        .unwrap();
    assert!(out.status.success(), "YAML parse error:\n{}", text(&out));
    let parsed: BTreeMap<String, Vec<Value>> = serde_json::from_slice(&out.stdout).unwrap();
    parsed
        .into_iter()
        .map(|(p, docs)| {
            let name = Path::new(&p)
                .file_name()
                .unwrap()
                .to_string_lossy()
                .into_owned();
            (name, docs)
        })
        .collect()
}

fn objects(files: &BTreeMap<String, Vec<Value>>) -> Vec<Obj> {
    let mut out = Vec::new();
    for (file, docs) in files {
        if file == "kustomization.yaml" {
            continue;
        }
        for v in docs {
            out.push(Obj {
                file: file.clone(),
                kind: v["kind"].as_str().unwrap_or_default().to_owned(),
                name: v["metadata"]["name"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned(),
                v: v.clone(),
            });
        }
    }
    out
}

fn s(v: &Value) -> &str {
    v.as_str().unwrap_or_default()
}

fn arr(v: &Value) -> &[Value] {
    v.as_array().map_or(&[], Vec::as_slice)
}

fn labels_match(selector: &Value, labels: &Value) -> bool {
    let Some(sel) = selector.as_object() else {
        return false;
    };
    !sel.is_empty() && sel.iter().all(|(k, v)| labels.get(k) == Some(v))
}

const WORKLOADS: &[&str] = &["Deployment", "StatefulSet", "DaemonSet"];

/// Containers that run as root, and the only capabilities they may add.
const ROOT_CONTAINERS: &[(&str, &str, &[&str])] = &[
    // chown/chmod of the hostPath directories for the agent's uid.
    ("DaemonSet/meshid-agent", "prepare", &["CHOWN", "FOWNER"]),
    // iptables rules in the pod's network namespace.
    ("Deployment/web", "iptables", &["NET_ADMIN", "NET_RAW"]),
];

/// hostPath directories a pod may mount.
const HOST_PATHS: &[&str] = &["/run/meshid/agent", "/var/lib/meshid/agent"];

/// The pod template of a workload.
fn pod_spec(o: &Obj) -> &Value {
    &o.v["spec"]["template"]["spec"]
}

/// All containers of a pod spec: (is init container, container).
fn containers(pod: &Value) -> Vec<(bool, &Value)> {
    arr(&pod["initContainers"])
        .iter()
        .map(|c| (true, c))
        .chain(arr(&pod["containers"]).iter().map(|c| (false, c)))
        .collect()
}

/// The data keys of a ConfigMap or Secret.
fn data_keys(o: &Obj) -> BTreeSet<String> {
    ["data", "stringData", "binaryData"]
        .iter()
        .filter_map(|k| o.v[k].as_object())
        .flat_map(|m| m.keys().cloned())
        .collect()
}

/// Cross-reference and policy checks that schemas cannot make. Returns the problems found.
fn check_manifests(objs: &[Obj]) -> Vec<String> {
    let mut errors = Vec::new();
    let mut err = |e: String| errors.push(e);
    let find = |kind: &str, name: &str| objs.iter().find(|o| o.kind == kind && o.name == name);
    let mut seen = BTreeSet::new();
    let mut used_config: BTreeSet<(String, String)> = BTreeSet::new();

    for o in objs {
        if s(&o.v["apiVersion"]).is_empty() || o.kind.is_empty() || o.name.is_empty() {
            err(format!(
                "{}: apiVersion, kind and metadata.name are required",
                o.id()
            ));
        }
        if !seen.insert((o.kind.clone(), o.name.clone())) {
            err(format!("{}: defined twice", o.id()));
        }
        let ns = s(&o.v["metadata"]["namespace"]);
        if o.kind != "Namespace" && ns != K8S_NAMESPACE {
            err(format!(
                "{}: namespace {K8S_NAMESPACE:?} expected, found {ns:?}",
                o.id()
            ));
        }
        if o.kind == "ServiceAccount" && o.v["automountServiceAccountToken"] != Value::Bool(false) {
            err(format!("{}: automountServiceAccountToken: false expected (no component uses the Kubernetes API)", o.id()));
        }
    }

    for o in objs.iter().filter(|o| WORKLOADS.contains(&o.kind.as_str())) {
        let id = o.id();
        let key = format!("{}/{}", o.kind, o.name);
        let pod = pod_spec(o);
        let labels = &o.v["spec"]["template"]["metadata"]["labels"];
        if !labels_match(&o.v["spec"]["selector"]["matchLabels"], labels) {
            err(format!(
                "{id}: selector does not match the pod template's labels"
            ));
        }
        match find("ServiceAccount", s(&pod["serviceAccountName"])) {
            Some(_) => {}
            None => err(format!(
                "{id}: serviceAccountName {:?} is not defined",
                pod["serviceAccountName"]
            )),
        }
        if pod["automountServiceAccountToken"] != Value::Bool(false) {
            err(format!(
                "{id}: automountServiceAccountToken: false expected"
            ));
        }
        if pod["hostNetwork"] == Value::Bool(true) {
            err(format!("{id}: hostNetwork is not needed by any component"));
        }
        if pod["hostPID"] == Value::Bool(true) && key != "DaemonSet/meshid-agent" {
            err(format!(
                "{id}: only the agent needs hostPID (workload attestation)"
            ));
        }
        if o.kind == "StatefulSet" {
            match find("Service", s(&o.v["spec"]["serviceName"])) {
                Some(svc)
                    if s(&svc.v["spec"]["clusterIP"]) == "None"
                        && labels_match(&svc.v["spec"]["selector"], labels) => {}
                _ => err(format!(
                    "{id}: serviceName must name a headless Service selecting its pods"
                )),
            }
        }

        // Volumes, and what they refer to.
        let mut volumes = BTreeSet::new();
        for v in arr(&pod["volumes"]) {
            let name = s(&v["name"]).to_owned();
            if !volumes.insert(name.clone()) {
                err(format!("{id}: volume {name} declared twice"));
            }
            for (kind, field, src) in [
                ("ConfigMap", "name", &v["configMap"]),
                ("Secret", "secretName", &v["secret"]),
            ] {
                if src.is_null() {
                    continue;
                }
                let target = s(&src[field]);
                used_config.insert((kind.to_owned(), target.to_owned()));
                match find(kind, target) {
                    None => err(format!(
                        "{id}: volume {name}: {kind} {target:?} is not defined"
                    )),
                    Some(t) => {
                        let keys = data_keys(t);
                        for item in arr(&src["items"]) {
                            if !keys.contains(s(&item["key"])) {
                                err(format!(
                                    "{id}: volume {name}: {kind} {target} has no key {:?}",
                                    item["key"]
                                ));
                            }
                        }
                    }
                }
            }
            if let Some(path) = v["hostPath"]["path"].as_str() {
                if !HOST_PATHS.contains(&path) {
                    err(format!(
                        "{id}: hostPath {path} is not one of {HOST_PATHS:?}"
                    ));
                }
            }
        }
        for t in arr(&o.v["spec"]["volumeClaimTemplates"]) {
            volumes.insert(s(&t["metadata"]["name"]).to_owned());
        }

        let mut port_names = BTreeSet::new();
        for (init, c) in containers(pod) {
            let cname = s(&c["name"]);
            let cid = format!("{id} container {cname}");
            let sidecar = init && s(&c["restartPolicy"]) == "Always";
            if init && !c["restartPolicy"].is_null() && !sidecar {
                err(format!(
                    "{cid}: an init container's restartPolicy can only be Always"
                ));
            }
            if s(&c["image"]).is_empty() {
                err(format!("{cid}: no image"));
            }
            for part in ["requests", "limits"] {
                for res in ["cpu", "memory"] {
                    if c["resources"][part][res].is_null() {
                        err(format!("{cid}: resources.{part}.{res} missing"));
                    }
                }
            }
            let sc = &c["securityContext"];
            if sc["allowPrivilegeEscalation"] != Value::Bool(false) {
                err(format!("{cid}: allowPrivilegeEscalation: false expected"));
            }
            if sc["readOnlyRootFilesystem"] != Value::Bool(true) {
                err(format!("{cid}: readOnlyRootFilesystem: true expected"));
            }
            if !arr(&sc["capabilities"]["drop"]).iter().any(|d| d == "ALL") {
                err(format!("{cid}: capabilities.drop: [ALL] expected"));
            }
            let added: Vec<&str> = arr(&sc["capabilities"]["add"]).iter().map(s).collect();
            match ROOT_CONTAINERS
                .iter()
                .find(|(w, n, _)| *w == key && *n == cname)
            {
                Some((_, _, allowed)) => {
                    if sc["runAsUser"] != 0 || sc["runAsNonRoot"] != Value::Bool(false) {
                        err(format!(
                            "{cid}: runs as root: say so (runAsUser: 0, runAsNonRoot: false)"
                        ));
                    }
                    if let Some(cap) = added.iter().find(|a| !allowed.contains(a)) {
                        err(format!("{cid}: capability {cap} beyond {allowed:?}"));
                    }
                }
                None => {
                    if sc["runAsNonRoot"] != Value::Bool(true) {
                        err(format!("{cid}: runAsNonRoot: true expected"));
                    }
                    if !added.is_empty() {
                        err(format!("{cid}: adds capabilities {added:?}"));
                    }
                }
            }
            let mut mounts = BTreeSet::new();
            for m in arr(&c["volumeMounts"]) {
                if !volumes.contains(s(&m["name"])) {
                    err(format!("{cid}: volumeMount {:?} has no volume", m["name"]));
                }
                if !mounts.insert(s(&m["mountPath"])) {
                    err(format!("{cid}: two mounts at {:?}", m["mountPath"]));
                }
            }
            for e in arr(&c["env"]) {
                for (kind, field) in [("ConfigMap", "configMapKeyRef"), ("Secret", "secretKeyRef")]
                {
                    let r = &e["valueFrom"][field];
                    if r.is_null() {
                        continue;
                    }
                    used_config.insert((kind.to_owned(), s(&r["name"]).to_owned()));
                    match find(kind, s(&r["name"])) {
                        Some(t) if data_keys(t).contains(s(&r["key"])) => {}
                        _ => err(format!(
                            "{cid}: env {:?}: {kind} key {r} is not defined",
                            e["name"]
                        )),
                    }
                }
            }
            let ports: Vec<&Value> = arr(&c["ports"]).iter().collect();
            for p in &ports {
                if let Some(n) = p["name"].as_str() {
                    if !port_names.insert(n.to_owned()) {
                        err(format!("{cid}: port name {n} used twice in the pod"));
                    }
                }
            }
            let probes = ["startupProbe", "livenessProbe", "readinessProbe"];
            if init && !sidecar {
                if probes.iter().any(|p| !c[p].is_null()) {
                    err(format!("{cid}: init containers cannot have probes"));
                }
                continue;
            }
            for p in ["livenessProbe", "readinessProbe"] {
                if c[p].is_null() {
                    err(format!("{cid}: {p} missing"));
                }
            }
            for p in probes {
                let probe = &c[p];
                if probe.is_null() {
                    continue;
                }
                let port = if !probe["httpGet"].is_null() {
                    Some(&probe["httpGet"]["port"])
                } else if !probe["tcpSocket"].is_null() {
                    Some(&probe["tcpSocket"]["port"])
                } else if arr(&probe["exec"]["command"]).is_empty() {
                    err(format!("{cid}: {p} has no handler"));
                    None
                } else {
                    None
                };
                if let Some(port) = port {
                    let declared = ports.iter().any(|cp| match port {
                        Value::String(n) => cp["name"] == *n,
                        n => cp["containerPort"] == *n,
                    });
                    if !declared {
                        err(format!(
                            "{cid}: {p} port {port} is not a port of this container"
                        ));
                    }
                }
            }
        }
    }

    // Services select pods, and their target ports exist there.
    for svc in objs.iter().filter(|o| o.kind == "Service") {
        let selector = &svc.v["spec"]["selector"];
        let pods: Vec<&Obj> = objs
            .iter()
            .filter(|o| WORKLOADS.contains(&o.kind.as_str()))
            .filter(|o| labels_match(selector, &o.v["spec"]["template"]["metadata"]["labels"]))
            .collect();
        if pods.is_empty() {
            err(format!(
                "{}: selector {selector} matches no pod template",
                svc.id()
            ));
        }
        for p in arr(&svc.v["spec"]["ports"]) {
            let target = if p["targetPort"].is_null() {
                &p["port"]
            } else {
                &p["targetPort"]
            };
            for w in &pods {
                let found = containers(pod_spec(w)).iter().any(|(_, c)| {
                    arr(&c["ports"]).iter().any(|cp| match target {
                        Value::String(n) => cp["name"] == *n,
                        n => cp["containerPort"] == *n,
                    })
                });
                if !found {
                    err(format!(
                        "{}: targetPort {target} is not a port of {}",
                        svc.id(),
                        w.id()
                    ));
                }
            }
        }
    }
    for o in objs
        .iter()
        .filter(|o| o.kind == "PodDisruptionBudget" || o.kind == "NetworkPolicy")
    {
        let sel = if o.kind == "NetworkPolicy" {
            &o.v["spec"]["podSelector"]["matchLabels"]
        } else {
            &o.v["spec"]["selector"]["matchLabels"]
        };
        let any = objs
            .iter()
            .filter(|w| WORKLOADS.contains(&w.kind.as_str()))
            .any(|w| labels_match(sel, &w.v["spec"]["template"]["metadata"]["labels"]));
        if !any {
            err(format!("{}: selector matches no pod template", o.id()));
        }
        for rule in arr(&o.v["spec"]["ingress"]) {
            for from in arr(&rule["from"]) {
                let sel = &from["podSelector"]["matchLabels"];
                if !sel.is_null()
                    && !objs
                        .iter()
                        .filter(|w| WORKLOADS.contains(&w.kind.as_str()))
                        .any(|w| labels_match(sel, &w.v["spec"]["template"]["metadata"]["labels"]))
                {
                    err(format!(
                        "{}: ingress podSelector {sel} matches no pod template",
                        o.id()
                    ));
                }
            }
        }
    }
    // Nothing defined for nobody.
    for o in objs
        .iter()
        .filter(|o| o.kind == "ConfigMap" || o.kind == "Secret")
    {
        if !used_config.contains(&(o.kind.clone(), o.name.clone())) {
            err(format!("{}: not used by any pod", o.id()));
        }
    }
    errors
}

/// The one object of `kind` named `name`.
fn get<'a>(objs: &'a [Obj], kind: &str, name: &str) -> &'a Obj {
    objs.iter()
        .find(|o| o.kind == kind && o.name == name)
        .unwrap_or_else(|| panic!("{kind}/{name} is not defined"))
}

/// The container (or init container) `name` of a workload.
fn container<'a>(o: &'a Obj, name: &str) -> &'a Value {
    containers(pod_spec(o))
        .into_iter()
        .map(|(_, c)| c)
        .find(|c| c["name"] == name)
        .unwrap_or_else(|| panic!("{} has no container {name}", o.id()))
}

/// The file `key` of ConfigMap `name`.
fn config_file(objs: &[Obj], name: &str, key: &str) -> String {
    s(&get(objs, "ConfigMap", name).v["data"][key]).to_owned()
}

/// Whether `path` is one of the container's mounts or lies in one.
fn mounted(c: &Value, path: &str) -> bool {
    arr(&c["volumeMounts"]).iter().any(|m| {
        let dir = s(&m["mountPath"]).trim_end_matches('/');
        path.strip_prefix(dir)
            .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
    })
}

/// The containerPort named `name` of container `c`.
fn container_port(c: &Value, name: &str) -> Option<u16> {
    arr(&c["ports"])
        .iter()
        .find(|p| p["name"] == name)
        .and_then(|p| p["containerPort"].as_u64())
        .map(|p| p as u16)
}

/// The volume of a pod that container `c` mounts at `mount_path`.
fn volume_at<'a>(o: &'a Obj, c: &Value, mount_path: &str) -> &'a Value {
    let name = arr(&c["volumeMounts"])
        .iter()
        .find(|m| m["mountPath"] == mount_path)
        .map(|m| s(&m["name"]).to_owned())
        .unwrap_or_else(|| panic!("{}: nothing mounted at {mount_path}", o.id()));
    arr(&pod_spec(o)["volumes"])
        .iter()
        .find(|v| v["name"] == name)
        .unwrap()
}

/// The command line of a container, command then args.
fn argv(c: &Value) -> Vec<String> {
    arr(&c["command"])
        .iter()
        .chain(arr(&c["args"]))
        .map(|v| s(v).to_owned())
        .collect()
}

/// The value after `flag` in `argv`.
fn flag<'a>(argv: &'a [String], name: &str) -> Option<&'a str> {
    argv.iter()
        .position(|a| a == name)
        .and_then(|i| argv.get(i + 1))
        .map(String::as_str)
}

/// Checks that the embedded configurations agree with the pods that use them: paths inside
/// mounts, listener ports declared, uids consistent with the iptables rules.
fn check_wiring(objs: &[Obj]) -> Vec<String> {
    let mut errors = Vec::new();
    let mut expect = |ok: bool, what: String| {
        if !ok {
            errors.push(what);
        }
    };

    let ca = get(objs, "StatefulSet", "meshid-ca");
    let ca_c = container(ca, "ca");
    let ca_toml = config_file(objs, "meshid-ca-config", "ca.toml");
    let ca_argv = argv(ca_c);
    let ca_config = flag(&ca_argv, "--config").unwrap_or_default();
    expect(
        mounted(ca_c, ca_config),
        format!("ca: --config {ca_config} is not mounted"),
    );
    for key in ["data_dir", "admin_socket"] {
        let p = toml_get(&ca_toml, "", key).unwrap();
        expect(
            mounted(ca_c, &p),
            format!("ca.toml {key} {p} is not on a volume of the ca container"),
        );
    }
    for key in ["upstream_cert", "upstream_key"] {
        let p = toml_get(&ca_toml, "ca", key).unwrap();
        expect(
            mounted(ca_c, &p),
            format!("ca.toml ca.{key} {p} is not mounted in the ca container"),
        );
    }
    let data_dir = toml_get(&ca_toml, "", "data_dir").unwrap();
    expect(
        !arr(&ca_c["volumeMounts"]).iter().any(|m| m["mountPath"] == data_dir.as_str()),
        format!("ca.toml data_dir {data_dir} must be a subdirectory of the volume (meshid-ca sets its mode)"),
    );
    for (key, port) in [("ops_address", "ops"), ("node_address", "node")] {
        let addr = toml_get(&ca_toml, "", key).unwrap();
        expect(
            addr.starts_with("0.0.0.0:"),
            format!("ca.toml {key} {addr} must listen on the pod IP"),
        );
        expect(
            container_port(ca_c, port) == Some(port_of(&addr)),
            format!("ca.toml {key} {addr} is not containerPort {port}"),
        );
    }
    let pgpass = arr(&ca_c["env"])
        .iter()
        .find(|e| e["name"] == "PGPASSFILE")
        .map(|e| s(&e["value"]).to_owned())
        .unwrap_or_default();
    expect(
        mounted(ca_c, &pgpass),
        format!("ca: PGPASSFILE {pgpass:?} is not mounted"),
    );
    let datastore = toml_get(&ca_toml, "", "datastore").unwrap();
    let userinfo = datastore
        .split_once("://")
        .map_or("", |(_, rest)| rest)
        .split('/')
        .next()
        .unwrap_or("")
        .rsplit_once('@')
        .map_or("", |(user, _)| user);
    expect(
        !userinfo.contains(':'),
        "ca.toml datastore must not carry a password (it comes from PGPASSFILE)".to_owned(),
    );
    let replicas = ca.v["spec"]["replicas"].as_u64().unwrap_or(0);
    expect(
        replicas >= 2,
        format!("meshid-ca replicas {replicas}: 2 or more expected"),
    );

    let agent = get(objs, "DaemonSet", "meshid-agent");
    let agent_c = container(agent, "agent");
    let agent_toml = config_file(objs, "meshid-agent-config", "agent.toml");
    let agent_argv = argv(agent_c);
    let agent_config = flag(&agent_argv, "--config").unwrap_or_default();
    expect(
        mounted(agent_c, agent_config),
        format!("agent: --config {agent_config} is not mounted"),
    );
    for key in [
        "trust_bundle_path",
        "data_dir",
        "socket_path",
        "join_token_file",
    ] {
        let p = toml_get(&agent_toml, "", key).unwrap();
        expect(
            mounted(agent_c, &p),
            format!("agent.toml {key} {p} is not mounted in the agent container"),
        );
    }
    let socket = toml_get(&agent_toml, "", "socket_path").unwrap();
    let socket_dir = Path::new(&socket)
        .parent()
        .unwrap()
        .to_str()
        .unwrap()
        .to_owned();
    let agent_socket_vol = volume_at(agent, agent_c, &socket_dir);
    expect(
        agent_socket_vol["hostPath"]["path"] == socket_dir.as_str()
            && agent_socket_vol["hostPath"]["type"] == "DirectoryOrCreate",
        format!(
            "agent: {socket_dir} must be the node's {socket_dir} (hostPath, DirectoryOrCreate)"
        ),
    );
    let ops = toml_get(&agent_toml, "", "ops_address").unwrap();
    expect(
        container_port(agent_c, "ops") == Some(port_of(&ops)),
        format!("agent.toml ops_address {ops} is not containerPort ops"),
    );
    let server = toml_get(&agent_toml, "", "server_address").unwrap();
    let node_svc = get(objs, "Service", server.split(':').next().unwrap());
    expect(
        arr(&node_svc.v["spec"]["ports"])
            .iter()
            .any(|p| p["port"] == port_of(&server)),
        format!("agent.toml server_address {server}: no such Service port"),
    );
    expect(
        agent_toml.contains("meshid-ca-0.meshid-ca:8443")
            && agent_toml.contains("meshid-ca-1.meshid-ca:8443"),
        "agent.toml extra_server_addresses: each CA server by its stable name".to_owned(),
    );
    expect(
        pod_spec(agent)["hostPID"] == Value::Bool(true),
        "agent: hostPID is needed for attestation".to_owned(),
    );

    let web = get(objs, "Deployment", "web");
    let proxy_c = container(web, "proxy");
    let app_c = container(web, "app");
    let iptables_c = container(web, "iptables");
    let proxy_toml = config_file(objs, "meshid-proxy-web", "proxy.toml");
    let proxy_argv = argv(proxy_c);
    let proxy_config = flag(&proxy_argv, "--config").unwrap_or_default();
    expect(
        mounted(proxy_c, proxy_config),
        format!("proxy: --config {proxy_config} is not mounted"),
    );
    let ipt = argv(iptables_c);
    expect(
        ipt.get(1..3) == Some(&["iptables".to_owned(), "install".to_owned()][..])
            && flag(&ipt, "--config") == Some(proxy_config)
            && mounted(iptables_c, proxy_config),
        format!("iptables init container: meshid-proxy iptables install --config {proxy_config} expected, found {ipt:?}"),
    );
    let proxy_uid = proxy_c["securityContext"]["runAsUser"].as_u64();
    expect(
        flag(&ipt, "--proxy-uid").and_then(|u| u.parse().ok()) == proxy_uid,
        format!(
            "iptables --proxy-uid must be the proxy container's runAsUser {proxy_uid:?}: {ipt:?}"
        ),
    );
    expect(
        app_c["securityContext"]["runAsUser"].as_u64() != proxy_uid,
        "the app must not run as the proxy's uid (its traffic would bypass the proxy)".to_owned(),
    );
    let app_port = container_port(app_c, "http").unwrap_or(0);
    let inbound: Vec<&str> = flag(&ipt, "--inbound-ports")
        .unwrap_or_default()
        .split(',')
        .collect();
    expect(
        inbound.contains(&app_port.to_string().as_str()),
        format!("iptables --inbound-ports {inbound:?} must capture the app's port {app_port}"),
    );
    let ops = toml_get(&proxy_toml, "", "ops_address").unwrap();
    expect(
        ops.starts_with("0.0.0.0:") && container_port(proxy_c, "proxy-ops") == Some(port_of(&ops)),
        format!("proxy.toml ops_address {ops} must be on the pod IP as containerPort proxy-ops (kubelet's probes)"),
    );
    expect(
        !inbound.contains(&port_of(&ops).to_string().as_str()),
        "the proxy's ops port must not be captured (kubelet's probes)".to_owned(),
    );
    let inbound_listen = toml_get(&proxy_toml, "transparent", "inbound_listen").unwrap();
    expect(
        container_port(proxy_c, "mesh-inbound") == Some(port_of(&inbound_listen)),
        format!("proxy.toml transparent.inbound_listen {inbound_listen} is not containerPort mesh-inbound"),
    );
    let policy = toml_get(&proxy_toml, "", "policy_file").unwrap();
    expect(
        mounted(proxy_c, &policy),
        format!("proxy.toml policy_file {policy} is not mounted"),
    );
    let policy_dir = Path::new(&policy).parent().unwrap().to_str().unwrap();
    expect(
        volume_at(web, proxy_c, policy_dir)["configMap"]["name"] == "meshid-policy"
            && !arr(&proxy_c["volumeMounts"])
                .iter()
                .any(|m| !m["subPath"].is_null()),
        "the policy ConfigMap must be mounted as a directory (subPath mounts never see updates)"
            .to_owned(),
    );
    let api = toml_get(&proxy_toml, "", "workload_api_socket").unwrap();
    let api_path = api.strip_prefix("unix://").unwrap_or(&api);
    expect(
        mounted(proxy_c, api_path),
        format!("proxy.toml workload_api_socket {api} is not mounted"),
    );
    let api_dir = Path::new(api_path).parent().unwrap().to_str().unwrap();
    let web_socket_vol = volume_at(web, proxy_c, api_dir);
    expect(
        web_socket_vol["hostPath"]["path"] == agent_socket_vol["hostPath"]["path"]
            && web_socket_vol["hostPath"]["type"] == "Directory",
        "the proxy must mount the agent's socket directory (hostPath, type Directory)".to_owned(),
    );
    expect(
        !mounted(app_c, api_path),
        "the app does not need the Workload API (the proxy holds the SVID)".to_owned(),
    );
    errors
}

/// A named change that makes the manifests wrong.
type Breakage = (&'static str, fn(&mut [Obj]));

#[test]
fn kubernetes_manifests_are_consistent_and_valid() {
    let files = load_k8s();
    let objs = objects(&files);

    // kustomization.yaml lists every manifest but the operator's examples.
    let kust = &files["kustomization.yaml"][0];
    assert_eq!(kust["namespace"], K8S_NAMESPACE);
    let listed: BTreeSet<String> = arr(&kust["resources"])
        .iter()
        .map(|r| s(r).to_owned())
        .collect();
    let on_disk: BTreeSet<String> = files
        .keys()
        .filter(|f| *f != "kustomization.yaml" && !f.ends_with(".example.yaml"))
        .cloned()
        .collect();
    assert_eq!(
        listed, on_disk,
        "kustomization.yaml resources vs. the files in deploy/kubernetes"
    );
    let images: BTreeSet<&str> = objs
        .iter()
        .filter(|o| WORKLOADS.contains(&o.kind.as_str()))
        .flat_map(|o| {
            containers(pod_spec(o))
                .into_iter()
                .map(|(_, c)| s(&c["image"]))
        })
        .collect();
    for i in arr(&kust["images"]) {
        let name = s(&i["name"]);
        assert!(
            images.iter().any(|img| img.split(':').next() == Some(name)),
            "kustomization.yaml images: {name} is used by no container"
        );
    }
    for kind in [
        "Namespace",
        "StatefulSet",
        "DaemonSet",
        "Deployment",
        "Service",
        "ConfigMap",
        "Secret",
        "ServiceAccount",
    ] {
        assert!(
            objs.iter().any(|o| o.kind == kind),
            "no {kind} in the manifests"
        );
    }

    let mut errors = check_manifests(&objs);
    errors.extend(check_wiring(&objs));
    assert!(
        errors.is_empty(),
        "deploy/kubernetes:\n{}",
        errors.join("\n")
    );

    // The cross-reference check is not vacuous: breaking a manifest is noticed.
    let breakages: Vec<Breakage> = vec![
        (
            "a ConfigMap volume naming an undefined ConfigMap",
            |objs: &mut [Obj]| {
                let o = objs.iter_mut().find(|o| o.kind == "DaemonSet").unwrap();
                o.v["spec"]["template"]["spec"]["volumes"][0]["configMap"]["name"] =
                    Value::from("meshid-agent-confg");
            },
        ),
        (
            "a container without readinessProbe",
            |objs: &mut [Obj]| {
                let o = objs
                    .iter_mut()
                    .find(|o| o.name == "meshid-ca" && o.kind == "StatefulSet")
                    .unwrap();
                o.v["spec"]["template"]["spec"]["containers"][0]
                    .as_object_mut()
                    .unwrap()
                    .remove("readinessProbe");
            },
        ),
        ("a Service selecting no pod", |objs: &mut [Obj]| {
            let o = objs
                .iter_mut()
                .find(|o| o.kind == "Service" && o.name == "web")
                .unwrap();
            o.v["spec"]["selector"]["app.kubernetes.io/name"] = Value::from("wbe");
        }),
        ("a probe on an undeclared port", |objs: &mut [Obj]| {
            let o = objs.iter_mut().find(|o| o.kind == "DaemonSet").unwrap();
            o.v["spec"]["template"]["spec"]["containers"][0]["livenessProbe"]["httpGet"]["port"] =
                Value::from("health");
        }),
        ("a writable root file system", |objs: &mut [Obj]| {
            let o = objs.iter_mut().find(|o| o.kind == "Deployment").unwrap();
            o.v["spec"]["template"]["spec"]["containers"][0]["securityContext"]
                ["readOnlyRootFilesystem"] = Value::Bool(false);
        }),
    ];
    for (what, breakage) in &breakages {
        let mut broken = objs.clone();
        breakage(&mut broken);
        let mut found = check_manifests(&broken);
        found.extend(check_wiring(&broken));
        assert!(!found.is_empty(), "the check did not notice {what}");
    }
    println!(
        "cross-reference check: {} objects in {} files OK ({} deliberate breakages noticed)",
        objs.len(),
        files.len(),
        breakages.len()
    );

    schema_validation(&files);

    if tool_works("kubectl", &["version", "--client"]) {
        let out = Command::new("kubectl")
            .args(["kustomize"])
            .arg(deploy("kubernetes"))
            .output()
            .unwrap();
        assert!(out.status.success(), "kubectl kustomize: {}", text(&out));
        println!("kubectl kustomize deploy/kubernetes: OK");
    } else {
        println!("SKIPPED kubectl kustomize: kubectl is not installed");
    }
}

/// The Kubernetes versions the manifests are validated against: the first with native sidecar
/// containers on by default, and the newest the validator knows.
const K8S_VERSIONS: &[&str] = &["1.29.0", "latest"];

fn schema_validation(files: &BTreeMap<String, Vec<Value>>) {
    let dir = deploy("kubernetes");
    if !tool_works("python3", &["-c", "import kubernetes_validate"]) {
        let msg = "schema validation SKIPPED: kubernetes-validate is not installed (python3 -m pip install kubernetes-validate==1.37.0); only the cross-reference check ran";
        assert!(
            std::env::var_os("MESHID_CI").is_none(),
            "{msg}; CI must run the schema validation"
        );
        println!("{msg}");
        return;
    }
    let manifests: Vec<PathBuf> = files
        .keys()
        .filter(|f| *f != "kustomization.yaml")
        .map(|f| dir.join(f))
        .collect();
    let validate = |paths: &[PathBuf], version: &str| {
        let mut cmd = Command::new("python3");
        cmd.args(["-m", "kubernetes_validate", "--strict", "--quiet"]);
        if version != "latest" {
            cmd.args(["-k", version]);
        }
        cmd.args(paths).output().unwrap()
    };
    for version in K8S_VERSIONS {
        let out = validate(&manifests, version);
        assert!(
            out.status.success(),
            "kubernetes-validate --strict (Kubernetes {version}):\n{}",
            text(&out)
        );
    }
    // The validator is strict here: an unknown field fails.
    let scratch = tempfile::tempdir().unwrap();
    let bad = scratch.path().join("bad.yaml");
    std::fs::write(
        &bad,
        read(&dir.join("agent.yaml")).replacen(
            "readOnlyRootFilesystem:",
            "readOnlyRootFilesytem:",
            1,
        ),
    )
    .unwrap();
    let out = validate(&[bad], K8S_VERSIONS[0]);
    assert!(
        !out.status.success(),
        "kubernetes-validate --strict accepted an unknown field:\n{}",
        text(&out)
    );
    let version = Command::new("python3")
        .args(["-m", "kubernetes_validate", "--version"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default();
    println!(
        "schema validation: kubernetes-validate {version} --strict, Kubernetes {}: {} files OK",
        K8S_VERSIONS.join(" and "),
        manifests.len()
    );
}

/// Runs an init container's shell script with its absolute paths moved under `root`.
fn run_script(script: &str, root: &Path, env: &[(&str, &str)], moves: &[&str]) -> Output {
    let mut script = script.replace(
        "/usr/local/bin/",
        &format!("{}/", meshid_tests::bin_dir().display()),
    );
    for m in moves {
        script = script.replace(m, &format!("{}{m}", root.display()));
    }
    Command::new("sh")
        .arg("-c")
        .arg(&script)
        .envs(env.iter().copied())
        .output()
        .unwrap()
}

#[test]
fn kubernetes_configs_pass_check() {
    let files = load_k8s();
    let objs = objects(&files);
    let dir = tempfile::tempdir().unwrap();
    let write = |name: &str, body: &str| {
        let p = dir.path().join(name);
        std::fs::write(&p, body).unwrap();
        p
    };

    let ca_path = write(
        "ca.toml",
        &config_file(&objs, "meshid-ca-config", "ca.toml"),
    );
    let (code, out) = run(
        "meshid-ca",
        &["run", "--config", ca_path.to_str().unwrap(), "--check"],
    );
    assert_eq!(code, 0, "meshid-ca-config ca.toml: {out}");
    let agent_path = write(
        "agent.toml",
        &config_file(&objs, "meshid-agent-config", "agent.toml"),
    );
    let (code, out) = run(
        "meshid-agent",
        &["run", "--config", agent_path.to_str().unwrap(), "--check"],
    );
    assert_eq!(code, 0, "meshid-agent-config agent.toml: {out}");
    let policy_path = write(
        "policy.yaml",
        &config_file(&objs, "meshid-policy", "policy.yaml"),
    );
    let (code, out) = run(
        "meshid-proxy",
        &["policy", "check", policy_path.to_str().unwrap()],
    );
    assert_eq!(
        code, 0,
        "meshid-policy policy.yaml (0 = no warnings): {out}"
    );
    let (code, out) = check_proxy_config(
        dir.path(),
        &config_file(&objs, "meshid-proxy-web", "proxy.toml"),
        &policy_path,
    );
    assert_eq!(code, 0, "meshid-proxy-web proxy.toml: {out}");

    // The CA's init container: ca.toml with this pod's server_id, the key and the libpq
    // password file private (mode 0600), and the result passes --check.
    let ca = get(&objs, "StatefulSet", "meshid-ca");
    let prepare = argv(container(ca, "prepare"));
    assert_eq!(prepare[..2], ["/bin/sh", "-c"]);
    let root = dir.path().join("ca-root");
    for (d, f, body) in [
        (
            "etc/meshid/ca",
            "ca.toml",
            config_file(&objs, "meshid-ca-config", "ca.toml"),
        ),
        (
            "etc/meshid/upstream",
            "tls.key",
            "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n".to_owned(),
        ),
        ("etc/meshid/postgres", "password", "pa:ss\\word".to_owned()),
        ("run/meshid-ca", ".keep", String::new()),
    ] {
        std::fs::create_dir_all(root.join(d)).unwrap();
        std::fs::write(root.join(d).join(f), body).unwrap();
        std::fs::set_permissions(root.join(d).join(f), std::fs::Permissions::from_mode(0o440))
            .unwrap();
    }
    let out = run_script(
        &prepare[2],
        &root,
        &[("POD_NAME", "meshid-ca-1")],
        &["/etc/meshid/", "/run/meshid-ca/"],
    );
    assert!(
        out.status.success(),
        "the CA's init script failed:\n{}",
        text(&out)
    );
    let prepared = root.join("run/meshid-ca");
    let rendered = read(&prepared.join("ca.toml"));
    assert_eq!(
        toml_get(&rendered, "", "server_id").as_deref(),
        Some("meshid-ca-1")
    );
    assert_eq!(read(&prepared.join("pgpass")), "*:*:*:*:pa:ss\\word\n");
    for f in ["ca.toml", "pgpass", "upstream.key"] {
        assert_eq!(mode(&prepared.join(f)), 0o600, "{f}");
    }
    assert_eq!(
        read(&prepared.join("upstream.key")),
        read(&root.join("etc/meshid/upstream/tls.key"))
    );

    // The agent's init container: the directories handed to the agent's uid, this node's
    // token copied, or an empty file when there is none.
    if !is_root() {
        println!("SKIPPED the agent's init script: it chowns, which needs root");
    } else {
        let agent = get(&objs, "DaemonSet", "meshid-agent");
        let prepare = argv(container(agent, "prepare"));
        let agent_uid = container(agent, "agent")["securityContext"]["runAsUser"]
            .as_u64()
            .unwrap() as u32;
        let root = dir.path().join("agent-root");
        for d in [
            "run/meshid/agent",
            "var/lib/meshid/agent",
            "etc/meshid/join-tokens",
            "run/meshid-agent",
        ] {
            std::fs::create_dir_all(root.join(d)).unwrap();
        }
        std::fs::write(root.join("etc/meshid/join-tokens/node-1"), "TOKEN-1\n").unwrap();
        let moves = [
            "/run/meshid/agent",
            "/var/lib/meshid/agent",
            "/etc/meshid/join-tokens",
            "/run/meshid-agent",
        ];
        for (node, token) in [("node-1", "TOKEN-1\n"), ("node-2", "")] {
            let out = run_script(&prepare[2], &root, &[("NODE_NAME", node)], &moves);
            assert!(
                out.status.success(),
                "the agent's init script failed:\n{}",
                text(&out)
            );
            let file = root.join("run/meshid-agent/join-token");
            assert_eq!(read(&file), token, "{node}");
            assert_eq!(mode(&file), 0o600);
            assert_eq!(std::fs::metadata(&file).unwrap().uid(), agent_uid);
        }
        assert_eq!(mode(&root.join("run/meshid/agent")), 0o755);
        assert_eq!(mode(&root.join("var/lib/meshid/agent")), 0o700);
        for d in ["run/meshid/agent", "var/lib/meshid/agent"] {
            assert_eq!(
                std::fs::metadata(root.join(d)).unwrap().uid(),
                agent_uid,
                "{d}"
            );
        }
    }
    println!("ConfigMap configurations pass --check; init scripts behave");
}
