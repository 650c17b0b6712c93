//! `meshid-proxy iptables ...` without touching the machine's rules: `--dry-run` output,
//! defaults taken from a proxy configuration, and usage errors. (The rules are applied for
//! real in network namespaces by `tests/tests/e2e/netns.rs`.)

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::process::{Command, Output};

fn proxy(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_meshid-proxy"))
        .args(args)
        .output()
        .unwrap()
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn dry_run_prints_the_rules_in_order() {
    let o = proxy(&[
        "iptables",
        "install",
        "--dry-run",
        "--proxy-uid",
        "1337",
        "--inbound-ports",
        "8080,9090",
        "--exclude-outbound-cidrs",
        "10.96.0.0/12,fd00::/8",
        "--ipv6",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let lines: Vec<String> = stdout(&o).lines().map(str::to_owned).collect();
    let v4: Vec<&String> = lines
        .iter()
        .filter(|l| l.starts_with("iptables "))
        .collect();
    let v6: Vec<&String> = lines
        .iter()
        .filter(|l| l.starts_with("ip6tables "))
        .collect();
    assert_eq!(
        v4.first().unwrap().as_str(),
        "iptables -w 5 -t nat -N MESHID_INBOUND"
    );
    assert_eq!(
        v4.last().unwrap().as_str(),
        "iptables -w 5 -t nat -A OUTPUT -p tcp -j MESHID_OUTPUT"
    );
    for want in [
        "-A MESHID_INBOUND -p tcp --dport 8080 -j REDIRECT --to-ports 15006",
        "-A MESHID_INBOUND -p tcp --dport 9090 -j REDIRECT --to-ports 15006",
        "-A MESHID_OUTPUT -m owner --uid-owner 1337 -j RETURN",
        "-A MESHID_OUTPUT -d 10.96.0.0/12 -j RETURN",
        "-A MESHID_OUTPUT -p tcp -j REDIRECT --to-ports 15001",
    ] {
        assert!(
            v4.iter().any(|l| l.ends_with(want)),
            "missing {want}:\n{lines:#?}"
        );
    }
    assert!(v6
        .iter()
        .any(|l| l.ends_with("-A MESHID_OUTPUT -d fd00::/8 -j RETURN")));
    assert!(!v6.iter().any(|l| l.contains("10.96.0.0")));
    assert!(!v4.iter().any(|l| l.contains("fd00::")));

    let o = proxy(&["iptables", "uninstall", "--dry-run"]);
    assert!(o.status.success());
    assert_eq!(
        stdout(&o).lines().next(),
        Some("iptables -w 5 -t nat -D PREROUTING -p tcp -j MESHID_INBOUND")
    );
}

#[test]
fn defaults_come_from_the_proxy_config() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("proxy.toml");
    std::fs::write(
        &config,
        "ops_address = \"0.0.0.0:15900\"\n[transparent]\noutbound_listen = \"127.0.0.1:25001\"\ninbound_listen = \"0.0.0.0:25006\"\nmark = 0x539\n",
    )
    .unwrap();
    let path = config.display().to_string();
    let o = proxy(&["iptables", "install", "--dry-run", "--config", &path]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    assert!(
        out.contains("-A MESHID_OUTPUT -m mark --mark 0x539 -j RETURN"),
        "{out}"
    );
    assert!(
        out.contains("-A MESHID_OUTPUT -p tcp -j REDIRECT --to-ports 25001"),
        "{out}"
    );
    assert!(
        out.contains("-A MESHID_INBOUND -p tcp -j REDIRECT --to-ports 25006"),
        "{out}"
    );
    // The ops port is reachable by probes: never captured.
    assert!(
        out.contains("-A MESHID_INBOUND -p tcp --dport 15900 -j RETURN"),
        "{out}"
    );
    // Flags win over the file.
    let o = proxy(&[
        "iptables",
        "install",
        "--dry-run",
        "--config",
        &path,
        "--outbound-port",
        "31001",
    ]);
    assert!(stdout(&o).contains("--to-ports 31001"));
}

#[test]
fn bad_input_is_a_usage_error() {
    let dir = tempfile::tempdir().unwrap();
    let plain = dir.path().join("plain.toml");
    std::fs::write(
        &plain,
        "[[inbound]]\nlisten = \"127.0.0.1:1\"\nforward_to = \"127.0.0.1:2\"\n",
    )
    .unwrap();
    let plain = plain.display().to_string();
    let cases: &[(&[&str], &str)] = &[
        (&["--dry-run"], "--proxy-uid or --proxy-mark"),
        (&["--dry-run", "--proxy-mark", "0"], "non-zero"),
        (&["--dry-run", "--proxy-mark", "0xzz"], "is not a mark"),
        (
            &[
                "--dry-run",
                "--proxy-uid",
                "1",
                "--exclude-outbound-cidrs",
                "10.0.0.1/8",
            ],
            "host bits",
        ),
        (
            &[
                "--dry-run",
                "--proxy-uid",
                "1",
                "--include-outbound-cidrs",
                "bogus",
            ],
            "not an address",
        ),
        (
            &[
                "--dry-run",
                "--proxy-uid",
                "1",
                "--inbound-ports",
                "80,http",
            ],
            "--inbound-ports",
        ),
        (
            &["--dry-run", "--proxy-uid", "1", "--inbound-ports", "15006"],
            "own inbound listener",
        ),
        (
            &["--dry-run", "--proxy-uid", "1", "--inbound-port", "15001"],
            "share port",
        ),
        (
            &["--dry-run", "--proxy-uid", "1", "--config", &plain],
            "no [transparent] table",
        ),
        (
            &[
                "--dry-run",
                "--proxy-uid",
                "1",
                "--config",
                "/nonexistent/proxy.toml",
            ],
            "/nonexistent/proxy.toml",
        ),
    ];
    for (args, want) in cases {
        let mut full = vec!["iptables", "install"];
        full.extend_from_slice(args);
        let o = proxy(&full);
        assert_eq!(o.status.code(), Some(64), "{args:?}: {}", stderr(&o));
        assert!(stdout(&o).is_empty(), "{args:?} printed rules");
        assert!(
            stderr(&o).contains(want),
            "{args:?}: {:?} lacks {want:?}",
            stderr(&o)
        );
    }
}
