//! The systemd units in `deploy/systemd`: hardening, `systemd-analyze verify` and its offline
//! security score, sysusers.d and tmpfiles.d on a scratch root, and the example configurations
//! through the binaries' own `--check`.

use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use super::*;

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
