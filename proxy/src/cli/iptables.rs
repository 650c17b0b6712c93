//! `meshid-proxy iptables install|uninstall`: the netfilter rules of transparent mode, run
//! in the workload's network namespace (a Kubernetes init container, a systemd
//! `ExecStartPre=+`, or by hand).
//!
//! Two chains in the `nat` table, each entered from a built-in chain by one jump:
//!
//! - `MESHID_OUTPUT` (from `OUTPUT`): the application's outbound TCP is redirected to the
//!   proxy's transparent outbound listener, except the proxy's own connections (its uid, or
//!   its SO_MARK), loopback destinations, and the excluded ports and networks.
//! - `MESHID_INBOUND` (from `PREROUTING`): connections arriving for the service ports (all
//!   of them, or a list) are redirected to the transparent inbound listener, except the
//!   excluded ports (ssh, the proxy's ops port for probes, ...).
//!
//! `install` first removes what an earlier install left, so it can be re-run; if a command
//! fails, what was installed is removed again and the failing command is reported.
//! `uninstall` removes both chains and their jumps and succeeds when there is nothing to
//! remove.

use std::path::PathBuf;
use std::process::{Command, ExitCode};

use clap::{Args, Subcommand};
use meshid_proxy::config::{Cidr, Config};

/// The chain entered from `OUTPUT`.
pub const OUTPUT_CHAIN: &str = "MESHID_OUTPUT";
/// The chain entered from `PREROUTING`.
pub const INBOUND_CHAIN: &str = "MESHID_INBOUND";

/// IPv4 (`iptables`) or IPv6 (`ip6tables`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Family {
    /// IPv4.
    V4,
    /// IPv6.
    V6,
}

/// Which inbound ports are captured.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum InboundPorts {
    /// Every TCP port (except the excluded ones).
    All,
    /// These ports (none: inbound is not captured).
    Only(Vec<u16>),
}

/// What to install.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rules {
    /// The proxy's uid: its connections are not redirected.
    pub proxy_uid: Option<u32>,
    /// The proxy's SO_MARK: its connections are not redirected.
    pub proxy_mark: Option<u32>,
    /// The transparent outbound listener's port.
    pub outbound_port: u16,
    /// The transparent inbound listener's port.
    pub inbound_port: u16,
    /// Captured inbound ports.
    pub inbound_ports: InboundPorts,
    /// Inbound ports never captured.
    pub exclude_inbound_ports: Vec<u16>,
    /// Outbound destination ports never redirected.
    pub exclude_outbound_ports: Vec<u16>,
    /// Outbound destination networks never redirected.
    pub exclude_outbound_cidrs: Vec<Cidr>,
    /// Outbound destination networks redirected (empty: all).
    pub include_outbound_cidrs: Vec<Cidr>,
}

/// Why rules cannot be built.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct RulesError(String);

impl Rules {
    /// Checks what would make the rules loop or do nothing useful.
    pub fn validate(&self) -> Result<(), RulesError> {
        if self.proxy_uid.is_none() && self.proxy_mark.is_none() {
            return Err(RulesError(
                "give --proxy-uid or --proxy-mark (or `mark` in [transparent]): without one the \
                 proxy's own connections would be redirected back to it"
                    .into(),
            ));
        }
        if self.proxy_mark == Some(0) {
            return Err(RulesError(
                "--proxy-mark 0 marks nothing; use a non-zero mark".into(),
            ));
        }
        if self.outbound_port == 0 || self.inbound_port == 0 {
            return Err(RulesError("listener ports must not be 0".into()));
        }
        if self.outbound_port == self.inbound_port {
            return Err(RulesError(format!(
                "the outbound and inbound listeners cannot share port {}",
                self.outbound_port
            )));
        }
        if let InboundPorts::Only(ports) = &self.inbound_ports {
            if let Some(p) = ports.iter().find(|p| **p == self.inbound_port) {
                return Err(RulesError(format!(
                    "inbound port {p} is the proxy's own inbound listener"
                )));
            }
        }
        Ok(())
    }

    /// The `iptables` arguments (after `-t nat`) that install the rules for `family`, in order.
    pub fn install(&self, family: Family) -> Vec<Vec<String>> {
        let mut out: Vec<Vec<String>> = Vec::new();
        let mut rule = |chain: &str, args: &[&str]| {
            let mut v = vec!["-A".to_owned(), chain.to_owned()];
            v.extend(args.iter().map(|a| (*a).to_owned()));
            out.push(v);
        };
        let fits = |c: &&Cidr| c.is_ipv4() == (family == Family::V4);
        let to_out = self.outbound_port.to_string();
        let to_in = self.inbound_port.to_string();

        // Inbound.
        for p in &self.exclude_inbound_ports {
            rule(
                INBOUND_CHAIN,
                &["-p", "tcp", "--dport", &p.to_string(), "-j", "RETURN"],
            );
        }
        match &self.inbound_ports {
            InboundPorts::All => rule(
                INBOUND_CHAIN,
                &["-p", "tcp", "-j", "REDIRECT", "--to-ports", &to_in],
            ),
            InboundPorts::Only(ports) => {
                for p in ports {
                    rule(
                        INBOUND_CHAIN,
                        &[
                            "-p",
                            "tcp",
                            "--dport",
                            &p.to_string(),
                            "-j",
                            "REDIRECT",
                            "--to-ports",
                            &to_in,
                        ],
                    );
                }
            }
        }

        // Outbound: the proxy's own connections first.
        if let Some(uid) = self.proxy_uid {
            rule(
                OUTPUT_CHAIN,
                &[
                    "-m",
                    "owner",
                    "--uid-owner",
                    &uid.to_string(),
                    "-j",
                    "RETURN",
                ],
            );
        }
        if let Some(mark) = self.proxy_mark {
            rule(
                OUTPUT_CHAIN,
                &[
                    "-m",
                    "mark",
                    "--mark",
                    &format!("{mark:#x}"),
                    "-j",
                    "RETURN",
                ],
            );
        }
        let loopback = match family {
            Family::V4 => "127.0.0.0/8",
            Family::V6 => "::1/128",
        };
        rule(OUTPUT_CHAIN, &["-d", loopback, "-j", "RETURN"]);
        for p in &self.exclude_outbound_ports {
            rule(
                OUTPUT_CHAIN,
                &["-p", "tcp", "--dport", &p.to_string(), "-j", "RETURN"],
            );
        }
        for c in self.exclude_outbound_cidrs.iter().filter(fits) {
            rule(OUTPUT_CHAIN, &["-d", &c.to_string(), "-j", "RETURN"]);
        }
        if self.include_outbound_cidrs.is_empty() {
            rule(
                OUTPUT_CHAIN,
                &["-p", "tcp", "-j", "REDIRECT", "--to-ports", &to_out],
            );
        } else {
            for c in self.include_outbound_cidrs.iter().filter(fits) {
                rule(
                    OUTPUT_CHAIN,
                    &[
                        "-p",
                        "tcp",
                        "-d",
                        &c.to_string(),
                        "-j",
                        "REDIRECT",
                        "--to-ports",
                        &to_out,
                    ],
                );
            }
        }

        let mut all = vec![
            strings(&["-N", INBOUND_CHAIN]),
            strings(&["-N", OUTPUT_CHAIN]),
        ];
        all.extend(out);
        // The jumps last: nothing is redirected before the chains are complete.
        all.push(strings(&[
            "-A",
            "PREROUTING",
            "-p",
            "tcp",
            "-j",
            INBOUND_CHAIN,
        ]));
        all.push(strings(&["-A", "OUTPUT", "-p", "tcp", "-j", OUTPUT_CHAIN]));
        all
    }
}

/// The `iptables` arguments (after `-t nat`) that remove the rules: the jumps first, then the
/// chains. Each may fail because it is already gone.
pub fn uninstall() -> Vec<Vec<String>> {
    vec![
        strings(&["-D", "PREROUTING", "-p", "tcp", "-j", INBOUND_CHAIN]),
        strings(&["-D", "OUTPUT", "-p", "tcp", "-j", OUTPUT_CHAIN]),
        strings(&["-F", INBOUND_CHAIN]),
        strings(&["-X", INBOUND_CHAIN]),
        strings(&["-F", OUTPUT_CHAIN]),
        strings(&["-X", OUTPUT_CHAIN]),
    ]
}

/// `-w 5 -t nat ARGS`: wait up to 5 s for the xtables lock held by another writer.
fn full_args(args: &[String]) -> Vec<String> {
    let mut full = strings(&["-w", "5", "-t", "nat"]);
    full.extend(args.iter().cloned());
    full
}

fn strings(a: &[&str]) -> Vec<String> {
    a.iter().map(|s| (*s).to_owned()).collect()
}

/// Fills what the flags left out from the proxy's `[transparent]` configuration: listener
/// ports, the mark, and the ops port (kept out of inbound capture so probes reach it).
pub fn defaults_from(config: &Config, rules: &mut Rules, ports_given: (bool, bool)) {
    let Some(t) = &config.transparent else {
        return;
    };
    if !ports_given.0 {
        rules.outbound_port = t.outbound_listen.port();
    }
    if !ports_given.1 {
        rules.inbound_port = t.inbound_listen.port();
    }
    if rules.proxy_mark.is_none() {
        rules.proxy_mark = t.mark;
    }
    if !config.ops_address.ip().is_loopback() {
        let ops = config.ops_address.port();
        if !rules.exclude_inbound_ports.contains(&ops) {
            rules.exclude_inbound_ports.push(ops);
        }
    }
}

/// Runs iptables commands.
#[derive(Debug)]
pub struct Runner {
    /// The `iptables` binary.
    pub iptables: String,
    /// The `ip6tables` binary, when IPv6 rules are wanted.
    pub ip6tables: Option<String>,
}

/// A command that failed.
#[derive(Debug, thiserror::Error)]
#[error("`{command}` failed: {message}")]
pub struct RunError {
    /// The command line.
    pub command: String,
    /// Its stderr (or why it could not start).
    pub message: String,
}

impl Runner {
    fn families(&self) -> Vec<(Family, &str)> {
        let mut f = vec![(Family::V4, self.iptables.as_str())];
        if let Some(six) = &self.ip6tables {
            f.push((Family::V6, six.as_str()));
        }
        f
    }

    /// The command lines `install` runs (for `--dry-run`), after removing an earlier install.
    pub fn plan_install(&self, rules: &Rules) -> Vec<String> {
        self.families()
            .into_iter()
            .flat_map(|(family, bin)| {
                rules
                    .install(family)
                    .into_iter()
                    .map(move |args| format!("{bin} {}", full_args(&args).join(" ")))
            })
            .collect()
    }

    /// The command lines `uninstall` runs (for `--dry-run`).
    pub fn plan_uninstall(&self) -> Vec<String> {
        self.families()
            .into_iter()
            .flat_map(|(_, bin)| {
                uninstall()
                    .into_iter()
                    .map(move |args| format!("{bin} {}", full_args(&args).join(" ")))
            })
            .collect()
    }

    fn run(&self, bin: &str, args: &[String]) -> Result<(), RunError> {
        let full = full_args(args);
        let line = format!("{bin} {}", full.join(" "));
        let out = Command::new(bin)
            .args(&full)
            .output()
            .map_err(|e| RunError {
                command: line.clone(),
                message: format!("cannot run {bin}: {e}"),
            })?;
        if out.status.success() {
            tracing::debug!(command = %line, "ok");
            Ok(())
        } else {
            Err(RunError {
                command: line,
                message: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
            })
        }
    }

    /// Removes the rules; what is already gone is not an error.
    pub fn uninstall(&self) -> Result<(), RunError> {
        for (_, bin) in self.families() {
            for args in uninstall() {
                // A jump may have been added more than once by hand: remove every copy.
                for _ in 0..16 {
                    if self.run(bin, &args).is_err() || args[0] != "-D" {
                        break;
                    }
                }
            }
            self.check_gone(bin)?;
        }
        Ok(())
    }

    /// Fails when a meshid chain is still there (for example, referenced by a rule added by
    /// hand), so `uninstall` does not claim success it did not have.
    fn check_gone(&self, bin: &str) -> Result<(), RunError> {
        for chain in [INBOUND_CHAIN, OUTPUT_CHAIN] {
            if self.run(bin, &strings(&["-S", chain])).is_ok() {
                return Err(RunError {
                    command: format!("{bin} -t nat -X {chain}"),
                    message: format!(
                        "chain {chain} is still present (is it referenced by another rule?)"
                    ),
                });
            }
        }
        Ok(())
    }

    /// Installs `rules` (replacing an earlier install). On failure, removes what it added.
    pub fn install(&self, rules: &Rules) -> Result<(), RunError> {
        let _ = self.uninstall();
        for (family, bin) in self.families() {
            for args in rules.install(family) {
                if let Err(e) = self.run(bin, &args) {
                    let _ = self.uninstall();
                    return Err(e);
                }
            }
        }
        Ok(())
    }
}

// ---- the command line ----

#[derive(Subcommand, Debug)]
pub enum IptablesCommand {
    /// Redirect the application's outbound TCP and inbound service ports to the proxy
    /// (replaces an earlier install).
    Install(InstallArgs),
    /// Remove the rules (nothing to remove is not an error).
    Uninstall(IptablesCommon),
}

#[derive(Args, Debug)]
pub struct IptablesCommon {
    /// Print the iptables commands instead of running them.
    #[arg(long)]
    dry_run: bool,
    /// Also write IPv6 rules with ip6tables.
    #[arg(long)]
    ipv6: bool,
    /// The iptables binary (for example iptables-legacy).
    #[arg(long, default_value = "iptables")]
    iptables: String,
    /// The ip6tables binary.
    #[arg(long, default_value = "ip6tables")]
    ip6tables: String,
}

#[derive(Args, Debug)]
pub struct InstallArgs {
    #[command(flatten)]
    common: IptablesCommon,
    /// The proxy's configuration: listener ports, mark and ops port are taken from its
    /// [transparent] table unless given here.
    #[arg(long, short)]
    config: Option<PathBuf>,
    /// The uid the proxy runs as: its connections are not redirected.
    #[arg(long)]
    proxy_uid: Option<u32>,
    /// The SO_MARK the proxy sets (`mark` in [transparent]): its connections are not
    /// redirected.
    #[arg(long, value_parser = parse_mark)]
    proxy_mark: Option<u32>,
    /// The transparent outbound listener's port [default: 15001].
    #[arg(long)]
    outbound_port: Option<u16>,
    /// The transparent inbound listener's port [default: 15006].
    #[arg(long)]
    inbound_port: Option<u16>,
    /// Inbound ports to capture: `*` for all, a comma-separated list, or an empty string for
    /// none.
    #[arg(long, default_value = "*")]
    inbound_ports: String,
    /// Inbound ports never captured (comma-separated), e.g. 22.
    #[arg(long, value_delimiter = ',')]
    exclude_inbound_ports: Vec<u16>,
    /// Outbound destination ports never redirected (comma-separated).
    #[arg(long, value_delimiter = ',')]
    exclude_outbound_ports: Vec<u16>,
    /// Outbound destination networks never redirected (comma-separated CIDRs), e.g. the CA.
    #[arg(long, value_delimiter = ',', value_parser = parse_cidr)]
    exclude_outbound_cidrs: Vec<Cidr>,
    /// Only these outbound destination networks are redirected (default: all).
    #[arg(long, value_delimiter = ',', value_parser = parse_cidr)]
    include_outbound_cidrs: Vec<Cidr>,
}

fn parse_cidr(s: &str) -> Result<Cidr, String> {
    s.trim().parse()
}

fn parse_mark(s: &str) -> Result<u32, String> {
    let s = s.trim();
    match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        Some(hex) => u32::from_str_radix(hex, 16),
        None => s.parse(),
    }
    .map_err(|_| format!("{s:?} is not a mark (decimal or 0x-hex)"))
}

fn runner(c: &IptablesCommon) -> Runner {
    Runner {
        iptables: c.iptables.clone(),
        ip6tables: c.ipv6.then(|| c.ip6tables.clone()),
    }
}

/// Prints `lines` (a dry run's commands) on stdout.
fn print_lines(lines: &[String]) -> ExitCode {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    for l in lines {
        if writeln!(out, "{l}").is_err() {
            return ExitCode::FAILURE;
        }
    }
    ExitCode::SUCCESS
}

/// `meshid-proxy iptables install|uninstall`.
pub fn run(cmd: IptablesCommand) -> ExitCode {
    meshid_api::server::init_tracing(false, "info");
    let result = match cmd {
        IptablesCommand::Uninstall(common) => {
            let r = runner(&common);
            if common.dry_run {
                return print_lines(&r.plan_uninstall());
            }
            r.uninstall()
        }
        IptablesCommand::Install(args) => {
            let inbound_ports = match args.inbound_ports.trim() {
                "*" => InboundPorts::All,
                "" => InboundPorts::Only(Vec::new()),
                list => {
                    let parsed: Result<Vec<u16>, _> =
                        list.split(',').map(|p| p.trim().parse::<u16>()).collect();
                    match parsed {
                        Ok(p) => InboundPorts::Only(p),
                        Err(_) => {
                            eprintln!("meshid-proxy: --inbound-ports {list:?}: use *, a comma-separated list of ports, or \"\"");
                            return ExitCode::from(meshid_api::config::EXIT_CONFIG);
                        }
                    }
                }
            };
            let mut rules = Rules {
                proxy_uid: args.proxy_uid,
                proxy_mark: args.proxy_mark,
                outbound_port: args.outbound_port.unwrap_or(15001),
                inbound_port: args.inbound_port.unwrap_or(15006),
                inbound_ports,
                exclude_inbound_ports: args.exclude_inbound_ports,
                exclude_outbound_ports: args.exclude_outbound_ports,
                exclude_outbound_cidrs: args.exclude_outbound_cidrs,
                include_outbound_cidrs: args.include_outbound_cidrs,
            };
            if let Some(path) = &args.config {
                let config = match Config::load(path) {
                    Ok(c) => c,
                    Err(e) => return meshid_api::config::exit_refused("meshid-proxy", &e),
                };
                if config.transparent.is_none() {
                    eprintln!(
                        "meshid-proxy: {} has no [transparent] table: nothing would listen on the redirected ports",
                        path.display()
                    );
                    return ExitCode::from(meshid_api::config::EXIT_CONFIG);
                }
                defaults_from(
                    &config,
                    &mut rules,
                    (args.outbound_port.is_some(), args.inbound_port.is_some()),
                );
            }
            if let Err(e) = rules.validate() {
                eprintln!("meshid-proxy: {e}");
                return ExitCode::from(meshid_api::config::EXIT_CONFIG);
            }
            let r = runner(&args.common);
            if args.common.dry_run {
                return print_lines(&r.plan_install(&rules));
            }
            r.install(&rules)
        }
    };
    match result {
        Ok(()) => {
            eprintln!("meshid-proxy: iptables rules updated");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("meshid-proxy: {e}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules() -> Rules {
        Rules {
            proxy_uid: Some(1337),
            proxy_mark: None,
            outbound_port: 15001,
            inbound_port: 15006,
            inbound_ports: InboundPorts::All,
            exclude_inbound_ports: vec![22, 15000],
            exclude_outbound_ports: vec![8443],
            exclude_outbound_cidrs: vec![
                "10.96.0.1/32".parse().unwrap(),
                "fd00::/8".parse().unwrap(),
            ],
            include_outbound_cidrs: vec![],
        }
    }

    fn lines(r: &Rules, f: Family) -> Vec<String> {
        r.install(f).iter().map(|a| a.join(" ")).collect()
    }

    #[test]
    fn install_order_and_content() {
        assert_eq!(
            lines(&rules(), Family::V4),
            [
                "-N MESHID_INBOUND",
                "-N MESHID_OUTPUT",
                "-A MESHID_INBOUND -p tcp --dport 22 -j RETURN",
                "-A MESHID_INBOUND -p tcp --dport 15000 -j RETURN",
                "-A MESHID_INBOUND -p tcp -j REDIRECT --to-ports 15006",
                "-A MESHID_OUTPUT -m owner --uid-owner 1337 -j RETURN",
                "-A MESHID_OUTPUT -d 127.0.0.0/8 -j RETURN",
                "-A MESHID_OUTPUT -p tcp --dport 8443 -j RETURN",
                "-A MESHID_OUTPUT -d 10.96.0.1/32 -j RETURN",
                "-A MESHID_OUTPUT -p tcp -j REDIRECT --to-ports 15001",
                "-A PREROUTING -p tcp -j MESHID_INBOUND",
                "-A OUTPUT -p tcp -j MESHID_OUTPUT",
            ]
        );
    }

    #[test]
    fn ipv6_gets_its_own_networks_and_loopback() {
        let l = lines(&rules(), Family::V6);
        assert!(l.contains(&"-A MESHID_OUTPUT -d ::1/128 -j RETURN".to_owned()));
        assert!(l.contains(&"-A MESHID_OUTPUT -d fd00::/8 -j RETURN".to_owned()));
        assert!(!l.iter().any(|x| x.contains("10.96.0.1")));
    }

    #[test]
    fn listed_ports_mark_and_included_networks() {
        let mut r = rules();
        r.proxy_uid = None;
        r.proxy_mark = Some(0x539);
        r.inbound_ports = InboundPorts::Only(vec![8000, 9000]);
        r.include_outbound_cidrs = vec!["198.18.0.0/15".parse().unwrap()];
        let l = lines(&r, Family::V4);
        assert!(l.contains(
            &"-A MESHID_INBOUND -p tcp --dport 8000 -j REDIRECT --to-ports 15006".to_owned()
        ));
        assert!(l.contains(
            &"-A MESHID_INBOUND -p tcp --dport 9000 -j REDIRECT --to-ports 15006".to_owned()
        ));
        assert!(!l
            .iter()
            .any(|x| x == "-A MESHID_INBOUND -p tcp -j REDIRECT --to-ports 15006"));
        assert!(l.contains(&"-A MESHID_OUTPUT -m mark --mark 0x539 -j RETURN".to_owned()));
        assert!(!l.iter().any(|x| x.contains("uid-owner")));
        assert!(l.contains(
            &"-A MESHID_OUTPUT -p tcp -d 198.18.0.0/15 -j REDIRECT --to-ports 15001".to_owned()
        ));
        assert!(!l
            .iter()
            .any(|x| x == "-A MESHID_OUTPUT -p tcp -j REDIRECT --to-ports 15001"));
        // No inbound capture at all.
        r.inbound_ports = InboundPorts::Only(vec![]);
        assert!(!lines(&r, Family::V4)
            .iter()
            .any(|x| x.contains("--to-ports 15006")));
    }

    #[test]
    fn validation_refuses_loops() {
        let mut r = rules();
        r.proxy_uid = None;
        assert!(r
            .validate()
            .unwrap_err()
            .to_string()
            .contains("--proxy-uid or --proxy-mark"));
        r.proxy_mark = Some(0);
        assert!(r.validate().is_err());
        let mut r = rules();
        r.inbound_port = 15001;
        assert!(r.validate().unwrap_err().to_string().contains("share port"));
        let mut r = rules();
        r.inbound_ports = InboundPorts::Only(vec![80, 15006]);
        assert!(r
            .validate()
            .unwrap_err()
            .to_string()
            .contains("own inbound listener"));
        assert!(rules().validate().is_ok());
    }

    #[test]
    fn uninstall_removes_jumps_before_chains() {
        let u: Vec<String> = uninstall().iter().map(|a| a.join(" ")).collect();
        assert_eq!(u[0], "-D PREROUTING -p tcp -j MESHID_INBOUND");
        assert_eq!(u[1], "-D OUTPUT -p tcp -j MESHID_OUTPUT");
        assert!(
            u.iter().position(|x| x == "-X MESHID_INBOUND")
                > u.iter().position(|x| x == "-F MESHID_INBOUND")
        );
    }
}
