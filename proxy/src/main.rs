//! `meshid-proxy`: the mTLS sidecar (`run`) and the policy author's tools (`policy`).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use meshid_proxy::config::{Cidr, Config, ConfigError};
use meshid_proxy::iptables::{InboundPorts, Rules, Runner};
use meshid_proxy::policy_cli::PolicyCommand;

const EXIT_CONFIG: u8 = 64;

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

#[derive(Subcommand, Debug)]
enum IptablesCommand {
    /// Redirect the application's outbound TCP and inbound service ports to the proxy
    /// (replaces an earlier install).
    Install(InstallArgs),
    /// Remove the rules (nothing to remove is not an error).
    Uninstall(IptablesCommon),
}

#[derive(Args, Debug)]
struct IptablesCommon {
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
struct InstallArgs {
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
        Command::Policy(cmd) => meshid_proxy::policy_cli::run(cmd),
        Command::Healthcheck { ops_address } => healthcheck(&ops_address),
        Command::Run(args) => run(args),
        Command::Iptables(cmd) => iptables(cmd),
    }
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

fn iptables(cmd: IptablesCommand) -> ExitCode {
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
                            return ExitCode::from(EXIT_CONFIG);
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
                    Err(e) => return config_error(&e),
                };
                if config.transparent.is_none() {
                    eprintln!(
                        "meshid-proxy: {} has no [transparent] table: nothing would listen on the redirected ports",
                        path.display()
                    );
                    return ExitCode::from(EXIT_CONFIG);
                }
                meshid_proxy::iptables::defaults_from(
                    &config,
                    &mut rules,
                    (args.outbound_port.is_some(), args.inbound_port.is_some()),
                );
            }
            if let Err(e) = rules.validate() {
                eprintln!("meshid-proxy: {e}");
                return ExitCode::from(EXIT_CONFIG);
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

fn config_error(e: &ConfigError) -> ExitCode {
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
