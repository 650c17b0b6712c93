//! Command-line wiring: parse arguments, then either run the server or make one admin call.

use std::future::Future;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Args, Parser, Subcommand, ValueEnum};
use meshid_api::{admin, files};
use meshid_ca::config::{Config, ConfigError, RawConfig};

mod audit;
mod backup;
mod ci;
mod federation;
mod mesh;
mod policy;
mod root;
mod svid;

const DEFAULT_SOCKET: &str = "/var/lib/meshid/ca/admin.sock";

#[derive(Parser, Debug)]
#[command(
    name = "meshid-ca",
    version,
    about = "meshid certificate authority and operator CLI"
)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the CA server.
    Run(RunArgs),
    /// Write a consistent snapshot of the datastore and this server's keys to a file encrypted
    /// with age (a passphrase or recipients), while the server runs.
    Backup(backup::BackupArgs),
    /// Restore a backup into a fresh data directory and an empty datastore (all or nothing).
    Restore(backup::RestoreArgs),
    /// Manage registration entries.
    #[command(subcommand)]
    Entry(EntryCommand),
    /// Manage join tokens.
    #[command(subcommand)]
    Token(TokenCommand),
    /// Show the trust bundle.
    #[command(subcommand)]
    Bundle(BundleCommand),
    /// Mint an X.509-SVID for debugging (the key is generated here, never sent).
    #[command(subcommand)]
    X509(X509Command),
    /// Mint a JWT-SVID for debugging.
    #[command(subcommand)]
    Jwt(JwtCommand),
    /// Attested agents: list, show, evict, ban.
    #[command(subcommand)]
    Agent(AgentCommand),
    /// CA key status.
    #[command(subcommand)]
    Ca(CaCommand),
    /// Revoke X.509-SVIDs and intermediates; the CRLs.
    Svid {
        #[command(flatten)]
        conn: Conn,
        #[arg(long, value_enum, default_value = "text", global = true)]
        output: Output,
        #[command(subcommand)]
        command: svid::SvidCommand,
    },
    /// In a CI job: exchange the job's OIDC token for a short-lived SVID.
    #[command(subcommand)]
    Ci(ci::CiCommand),
    /// Federation with other trust domains: create, list, show, delete relationships.
    Federation {
        #[command(flatten)]
        conn: Conn,
        #[arg(long, value_enum, default_value = "text", global = true)]
        output: Output,
        #[command(subcommand)]
        command: federation::FederationCommand,
    },
    /// The central policy: named documents, versioned; apply, show, history, rollback.
    Policy {
        #[command(flatten)]
        conn: Conn,
        #[arg(long, value_enum, default_value = "text", global = true)]
        output: Output,
        #[command(subcommand)]
        command: policy::PolicyCommand,
    },
    /// Apply a mesh file (or a directory of them): make the CA's entries and policy documents
    /// of its owner match it, in one transaction; print the plan.
    Apply {
        #[command(flatten)]
        conn: Conn,
        /// `json`: one object, for CI (see `meshid-ca plan`).
        #[arg(long, value_enum, default_value = "text")]
        output: Output,
        #[command(flatten)]
        args: mesh::MeshArgs,
    },
    /// Print what `apply` would change; change nothing (`apply --dry-run`).
    Plan {
        #[command(flatten)]
        conn: Conn,
        /// `json`: one object: owner, files, dry_run, applied, changed, policy_revision,
        /// summary (create, update, adopt, delete, unchanged), changes and orphans (each with
        /// kind, action, id, spiffe_id, parent_id, selectors, fields, diff, declared_at).
        #[arg(long, value_enum, default_value = "text")]
        output: Output,
        #[command(flatten)]
        args: mesh::MeshArgs,
    },
    /// The audit log.
    #[command(subcommand)]
    Audit(AuditCommand),
    /// The read-only web console (`[console]`).
    #[command(subcommand)]
    Console(ConsoleCommand),
    /// Exit 0 if the server is ready (GET /readyz on its ops address: the issuing
    /// intermediate is valid and the datastore takes writes).
    Healthcheck {
        /// The server's ops listener [default: the configuration's `ops_address` with
        /// `--config`, else 127.0.0.1:8081].
        #[arg(long)]
        ops_address: Option<String>,
        /// The server's configuration file, to find its ops listener.
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
}

#[derive(Args, Debug)]
struct RunArgs {
    #[command(flatten)]
    server: backup::ServerArgs,
    /// Admin socket path (overrides the file).
    #[arg(long)]
    admin_socket: Option<PathBuf>,
    /// Health and metrics listener, host:port (overrides the file).
    #[arg(long)]
    ops_address: Option<String>,
    /// Node API listener for agents, ip:port (overrides the file; default 127.0.0.1:8443).
    #[arg(long)]
    node_address: Option<String>,
    /// Serve the web console here, host:port (overrides `[console] address`; loopback is
    /// plain HTTP for this host, any other address HTTPS).
    #[arg(long)]
    console_address: Option<String>,
    /// Check the configuration and exit.
    #[arg(long)]
    check: bool,
}

#[derive(Args, Debug, Clone)]
struct Conn {
    /// The CA's admin socket.
    #[arg(long, short = 's', default_value = DEFAULT_SOCKET, global = true)]
    socket: PathBuf,
}

#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
enum Output {
    Text,
    Json,
}

#[derive(Args, Debug)]
struct EntryFields {
    /// The SPIFFE ID to issue.
    #[arg(long)]
    spiffe_id: Option<String>,
    /// The parent (agent) SPIFFE ID.
    #[arg(long)]
    parent_id: Option<String>,
    /// A selector, type:key:value (repeat for several; a workload needs all).
    #[arg(long = "selector")]
    selectors: Vec<String>,
    /// X.509-SVID lifetime, e.g. 1h.
    #[arg(long, value_parser = humantime::parse_duration)]
    x509_ttl: Option<Duration>,
    /// JWT-SVID lifetime, e.g. 5m.
    #[arg(long, value_parser = humantime::parse_duration)]
    jwt_ttl: Option<Duration>,
    /// DNS SAN (repeatable).
    #[arg(long = "dns-name")]
    dns_names: Vec<String>,
    /// Federated trust domain (repeatable).
    #[arg(long = "federates-with")]
    federates_with: Vec<String>,
    /// Hint for workloads with several SVIDs.
    #[arg(long)]
    hint: Option<String>,
}

#[derive(Subcommand, Debug)]
enum EntryCommand {
    /// Create an entry.
    Create {
        #[command(flatten)]
        conn: Conn,
        /// Entry id (random if not given).
        #[arg(long)]
        id: Option<String>,
        #[command(flatten)]
        fields: EntryFields,
        #[arg(long, value_enum, default_value = "text")]
        output: Output,
    },
    /// List entries.
    List {
        #[command(flatten)]
        conn: Conn,
        /// Only entries with this parent.
        #[arg(long)]
        parent_id: Option<String>,
        #[arg(long, value_enum, default_value = "text")]
        output: Output,
    },
    /// Show one entry.
    Show {
        #[command(flatten)]
        conn: Conn,
        id: String,
        #[arg(long, value_enum, default_value = "text")]
        output: Output,
    },
    /// Change an entry; fields not given keep their value (selectors, DNS names and
    /// federations are replaced as a whole when given).
    Update {
        #[command(flatten)]
        conn: Conn,
        id: String,
        #[command(flatten)]
        fields: EntryFields,
        #[arg(long, value_enum, default_value = "text")]
        output: Output,
    },
    /// Delete an entry.
    Delete {
        #[command(flatten)]
        conn: Conn,
        id: String,
    },
    /// Replace the entry's SVIDs now, everywhere they are held (a new key and certificate per
    /// workload; the entry is otherwise unchanged).
    Rotate {
        #[command(flatten)]
        conn: Conn,
        id: String,
        /// Why, for the audit log (e.g. "key copied to a laptop").
        #[arg(long, default_value = "")]
        reason: String,
    },
}

#[derive(Subcommand, Debug)]
enum TokenCommand {
    /// Generate a single-use join token.
    Generate {
        #[command(flatten)]
        conn: Conn,
        /// Lifetime, e.g. 10m (default: the server's).
        #[arg(long, value_parser = humantime::parse_duration)]
        ttl: Option<Duration>,
    },
}

#[derive(Subcommand, Debug)]
enum ConsoleCommand {
    /// Print a single-use login token for a browser that is not on the CA's host (one on the
    /// host needs none). It opens a session at the console's login form.
    Token {
        #[command(flatten)]
        conn: Conn,
        /// How long the token waits to be used, e.g. 5m (default: the console's `token_ttl`).
        #[arg(long, value_parser = humantime::parse_duration)]
        ttl: Option<Duration>,
    },
}

#[derive(ValueEnum, Debug, Clone, Copy)]
enum BundleFormat {
    Pem,
    Spiffe,
}

#[derive(Subcommand, Debug)]
enum BundleCommand {
    /// Print the trust bundle.
    Show {
        #[command(flatten)]
        conn: Conn,
        #[arg(long, value_enum, default_value = "pem")]
        format: BundleFormat,
    },
}

#[derive(Subcommand, Debug)]
enum X509Command {
    /// Mint an X.509-SVID; writes svid.pem (leaf), chain.pem (leaf and intermediates),
    /// key.pem (mode 0600) and bundle.pem.
    Mint {
        #[command(flatten)]
        conn: Conn,
        #[arg(long)]
        spiffe_id: String,
        #[arg(long, value_parser = humantime::parse_duration)]
        ttl: Option<Duration>,
        #[arg(long = "dns-name")]
        dns_names: Vec<String>,
        /// Directory to write into.
        #[arg(long, default_value = ".")]
        out_dir: PathBuf,
    },
}

#[derive(Subcommand, Debug)]
enum JwtCommand {
    /// Mint a JWT-SVID and print it.
    Mint {
        #[command(flatten)]
        conn: Conn,
        #[arg(long)]
        spiffe_id: String,
        /// Audience (repeatable, at least one).
        #[arg(long = "audience", required = true)]
        audience: Vec<String>,
        #[arg(long, value_parser = humantime::parse_duration)]
        ttl: Option<Duration>,
    },
}

#[derive(Subcommand, Debug)]
enum AgentCommand {
    /// List attested agents.
    List {
        #[command(flatten)]
        conn: Conn,
        #[arg(long, value_enum, default_value = "text")]
        output: Output,
    },
    /// Show one agent.
    Show {
        #[command(flatten)]
        conn: Conn,
        /// The agent's SPIFFE ID.
        spiffe_id: String,
        #[arg(long, value_enum, default_value = "text")]
        output: Output,
    },
    /// Evict an agent: its SVID is no longer honoured and nothing is issued to it; it may
    /// attest again with a new join token.
    Evict {
        #[command(flatten)]
        conn: Conn,
        /// The agent's SPIFFE ID.
        spiffe_id: String,
    },
    /// Ban an agent: nothing is issued to it and it cannot attest again.
    Ban {
        #[command(flatten)]
        conn: Conn,
        /// The agent's SPIFFE ID.
        spiffe_id: String,
    },
    /// Replace the agent's own SVID and all its workloads' SVIDs now.
    Rotate {
        #[command(flatten)]
        conn: Conn,
        /// The agent's SPIFFE ID.
        spiffe_id: String,
        /// Why, for the audit log.
        #[arg(long, default_value = "")]
        reason: String,
    },
}

#[derive(Subcommand, Debug)]
enum CaCommand {
    /// Show the CA journal: roots, intermediates, JWT keys and their states.
    Status {
        #[command(flatten)]
        conn: Conn,
        #[arg(long, value_enum, default_value = "text")]
        output: Output,
    },
    /// Taint an intermediate or a JWT key (a suspected compromise): a fresh key takes over at
    /// once and every SVID the tainted one signed is re-issued across the mesh; `ca status`
    /// shows how many remain.
    Taint {
        #[command(flatten)]
        conn: Conn,
        /// The key's id (from `meshid-ca ca status`).
        key_id: String,
        /// Why (recorded in the audit log).
        #[arg(long, default_value = "")]
        reason: String,
    },
    /// Rotate the trust anchor in phases: prepare, activate, retire (and status).
    Root {
        #[command(flatten)]
        conn: Conn,
        #[arg(long, value_enum, default_value = "text", global = true)]
        output: Output,
        #[command(subcommand)]
        command: root::RootCommand,
    },
}

#[derive(Subcommand, Debug)]
enum AuditCommand {
    /// Check the hash chain; exit 1 and name the first bad record if it was tampered with.
    Verify {
        #[command(flatten)]
        conn: Conn,
        /// Also check this export (an `audit.file` sink) on its own: every record chains,
        /// every checkpoint's signature verifies; then check the CA's chain against it, so a
        /// record removed, rewritten or re-hashed on the CA since it was shipped is found.
        #[arg(long)]
        export: Option<PathBuf>,
        /// The checkpoint key's public half (`<checkpoint_key_file>.pub`): checkpoints signed
        /// by any other key are refused. Without it, the keys found are named.
        #[arg(long, requires = "export")]
        public_key: Option<PathBuf>,
        /// Check the export only, without the CA.
        #[arg(long, requires = "export")]
        offline: bool,
    },
    /// The records, oldest first: who did what, why, when, and (`<step>.effective`) when it
    /// took effect across the mesh.
    List {
        /// Only kinds starting with this (e.g. `svid.revoked`, `ca.root`).
        #[arg(long)]
        kind: Option<String>,
        /// Records after this sequence number.
        #[arg(long, default_value_t = 0)]
        after: i64,
        /// At most this many (at most 1000).
        #[arg(long, default_value_t = 100)]
        limit: u32,
        /// `json`: one JSON object per line.
        #[arg(long, value_enum, default_value = "text")]
        output: Output,
        #[command(flatten)]
        conn: Conn,
    },
}

/// Runs the parsed command.
pub async fn main(cli: Cli) -> ExitCode {
    match cli.command {
        Command::Run(args) => run(args).await,
        Command::Backup(args) => offline(backup::backup(args)).await,
        Command::Restore(args) => offline(backup::restore(args)).await,
        other => {
            meshid_api::server::init_tracing(false, "warn");
            match client(other).await {
                Ok(code) => code,
                Err(e) => {
                    eprintln!("meshid-ca: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

/// Runs a command that works on the datastore and files directly (not through the admin
/// socket).
async fn offline(f: impl Future<Output = anyhow::Result<ExitCode>>) -> ExitCode {
    meshid_api::server::init_tracing(false, "warn");
    match f.await {
        Ok(code) => code,
        Err(e) => {
            eprintln!("meshid-ca: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn load_config(args: &RunArgs) -> Result<Config, ConfigError> {
    let mut raw = args.server.raw()?;
    if let Some(sock) = &args.admin_socket {
        raw.admin_socket = Some(sock.clone());
    }
    if let Some(ops) = &args.ops_address {
        raw.ops_address = Some(ops.clone());
    }
    if let Some(node) = &args.node_address {
        raw.node_address = Some(node.clone());
    }
    if let Some(console) = &args.console_address {
        raw.console.address = Some(console.clone());
    }
    Config::try_from(raw)
}

async fn run(args: RunArgs) -> ExitCode {
    // Config is loaded and validated before anything is created or bound.
    let config = match load_config(&args) {
        Ok(c) => c,
        Err(e) => return meshid_api::config::exit_refused("meshid-ca", &e),
    };
    if args.check {
        eprintln!("meshid-ca: configuration is valid");
        return ExitCode::SUCCESS;
    }
    meshid_api::server::init_tracing(config.log_json, "info");
    match serve(config).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %format!("{e:#}"), "meshid-ca stopped");
            ExitCode::FAILURE
        }
    }
}

async fn serve(config: Config) -> anyhow::Result<()> {
    tracing::info!(
        trust_domain = %config.trust_domain,
        server_id = %config.server_id,
        datastore = %meshid_ca::config::redact_url(config.datastore.as_str()),
        data_dir = %config.data_dir.display(),
        "starting meshid-ca"
    );
    let ca = meshid_ca::server::build(&config).await?;
    let admin = meshid_api::uds::bind(&config.admin_socket, meshid_api::uds::Access::Owner)
        .with_context(|| format!("cannot bind admin socket {}", config.admin_socket.display()))?;
    let ops = tokio::net::TcpListener::bind(config.ops_address)
        .await
        .with_context(|| format!("cannot bind ops listener {}", config.ops_address))?;
    // The node API's accept queue takes a fleet of agents reconnecting at once.
    let node = meshid_api::server::listen_tcp(config.node_address)
        .with_context(|| format!("cannot bind node API listener {}", config.node_address))?;
    let bundle_endpoint = match &config.federation.bundle_endpoint {
        None => None,
        Some(e) => {
            let web = match &e.web_cert {
                Some((cert, key)) => Some(Arc::new(
                    meshid_ca::federation::endpoint::FileCert::load(cert, key)
                        .context("cannot load the bundle endpoint's certificate")?,
                )),
                None => None,
            };
            let listener = meshid_api::server::listen_tcp(e.address)
                .with_context(|| format!("cannot bind the bundle endpoint {}", e.address))?;
            tracing::info!(address = %listener.local_addr()?, profile = if web.is_some() { "https_web" } else { "https_spiffe" }, "bundle endpoint listening");
            Some((listener, web))
        }
    };
    let web_roots =
        meshid_ca::federation::fetch::WebRoots::load(config.federation.web_roots_file.as_deref())
            .context("cannot load federation.web_roots_file")?;
    let audit = meshid_ca::audit::ship::Shipping::load(&config.audit, &config.data_dir)
        .context("cannot load the audit checkpoint key")?;
    if let Some(file) = &config.audit.file {
        if file.starts_with(&config.data_dir) {
            tracing::warn!(file = %file.display(), "audit.file is inside the data directory: put it on a volume of its own, so that losing or rewriting one does not take the other");
        }
        tracing::info!(file = %file.display(), "shipping the audit trail to a file");
    }
    if let Some(key) = &audit.key {
        tracing::info!(key_id = %meshid_ca::audit::checkpoint::key_id(&key.public()), public_key = %meshid_ca::audit::checkpoint::public_key_path(&config.audit.checkpoint_key_file).display(), "audit checkpoints are signed; pin this key with `audit verify --public-key`");
    }
    let console = match &config.console {
        None => None,
        Some(c) => {
            let cert = match &c.cert {
                Some((cert, key)) => Some(Arc::new(
                    meshid_ca::federation::endpoint::FileCert::load(cert, key)
                        .context("cannot load the console's certificate")?,
                )),
                None => None,
            };
            let listener = tokio::net::TcpListener::bind(c.address)
                .await
                .with_context(|| format!("cannot bind the console {}", c.address))?;
            let scheme = if c.tls() { "https" } else { "http" };
            tracing::info!(url = %format!("{scheme}://{}", listener.local_addr()?), "console listening");
            Some(meshid_ca::server::ConsoleListener {
                listener,
                config: c.clone(),
                cert,
            })
        }
    };
    // Sized now for every agent connected at once: grown under load, each doubling would stall
    // the thread accepting for an RCU grace period.
    let descriptor_table =
        meshid_api::server::size_descriptor_table(config.node_limits.connections as u64);
    tracing::info!(admin_socket = %config.admin_socket.display(), ops_address = %ops.local_addr()?, node_address = %node.local_addr()?, descriptor_table, "listening");
    meshid_ca::server::run(
        ca,
        meshid_ca::server::Listeners {
            admin,
            node,
            ops,
            node_limits: config.node_limits.clone(),
            bundle_endpoint,
            web_roots,
            audit,
            console,
        },
        meshid_api::server::shutdown_signal(),
    )
    .await
}

async fn channel(conn: &Conn) -> anyhow::Result<tonic::transport::Channel> {
    Ok(meshid_api::client::connect_unix(&conn.socket).await?)
}

fn status_err(s: tonic::Status) -> anyhow::Error {
    anyhow::anyhow!("{}", s.message())
}

fn entry_json(e: &admin::Entry) -> serde_json::Value {
    serde_json::json!({
        "id": e.id,
        "spiffe_id": e.spiffe_id,
        "parent_id": e.parent_id,
        "selectors": e.selectors,
        "x509_svid_ttl": e.x509_svid_ttl,
        "jwt_svid_ttl": e.jwt_svid_ttl,
        "dns_names": e.dns_names,
        "federates_with": e.federates_with,
        "admin": e.admin,
        "hint": e.hint,
        "created_at": e.created_at,
        "updated_at": e.updated_at,
        "revision": e.revision,
        "owner": e.owner,
    })
}

fn entry_text(e: &admin::Entry) -> String {
    let mut s = format!(
        "Entry ID       : {}\nSPIFFE ID      : {}\nParent ID      : {}\nRevision       : {}\n",
        e.id, e.spiffe_id, e.parent_id, e.revision
    );
    let ttl = |t: u64| {
        if t == 0 {
            "default".to_owned()
        } else {
            format!("{t}s")
        }
    };
    s.push_str(&format!(
        "X509-SVID TTL  : {}\nJWT-SVID TTL   : {}\n",
        ttl(e.x509_svid_ttl),
        ttl(e.jwt_svid_ttl)
    ));
    for sel in &e.selectors {
        s.push_str(&format!("Selector       : {sel}\n"));
    }
    for d in &e.dns_names {
        s.push_str(&format!("DNS name       : {d}\n"));
    }
    for f in &e.federates_with {
        s.push_str(&format!("FederatesWith  : {f}\n"));
    }
    if e.admin {
        s.push_str("Admin          : true\n");
    }
    if !e.hint.is_empty() {
        s.push_str(&format!("Hint           : {}\n", e.hint));
    }
    if !e.owner.is_empty() {
        s.push_str(&format!("Owner          : {} (meshid-ca apply)\n", e.owner));
    }
    s
}

fn agent_json(a: &admin::Agent) -> serde_json::Value {
    serde_json::json!({
        "spiffe_id": a.spiffe_id,
        "attestation_type": a.attestation_type,
        "serial": a.serial,
        "expires_at": a.expires_at,
        "created_at": a.created_at,
        "banned": a.banned,
        "delivered_bundle_sequence": a.delivered_bundle_sequence,
        "x509_streams": a.x509_streams,
        "delivery_reported_at": a.delivery_reported_at,
        "delivery_server_id": a.delivery_server_id,
        "policy_revision": a.policy_revision,
    })
}

fn agent_text(a: &admin::Agent) -> String {
    let delivery = if a.delivery_reported_at == 0 {
        "never reported".to_owned()
    } else {
        format!(
            "sequence {} to {} X.509 streams (reported at {} to {})",
            a.delivered_bundle_sequence,
            a.x509_streams,
            a.delivery_reported_at,
            a.delivery_server_id
        )
    };
    format!(
        "SPIFFE ID        : {}\nAttestation type : {}\nSerial           : {}\nExpires at       : {}\nCreated at       : {}\nBanned           : {}\nBundle delivered : {}\nPolicy delivered : {}\n",
        a.spiffe_id,
        a.attestation_type,
        a.serial,
        a.expires_at,
        a.created_at,
        a.banned,
        delivery,
        if a.policy_revision == 0 {
            "none".to_owned()
        } else {
            format!(
                "revision {} (to every proxy following it, or held)",
                a.policy_revision
            )
        }
    )
}

fn print_entry(e: &admin::Entry, output: Output) {
    match output {
        Output::Json => println!("{}", entry_json(e)),
        Output::Text => print!("{}", entry_text(e)),
    }
}

fn apply_fields(e: &mut admin::Entry, f: EntryFields) {
    if let Some(v) = f.spiffe_id {
        e.spiffe_id = v;
    }
    if let Some(v) = f.parent_id {
        e.parent_id = v;
    }
    if !f.selectors.is_empty() {
        e.selectors = f.selectors;
    }
    if let Some(v) = f.x509_ttl {
        e.x509_svid_ttl = v.as_secs().max(1);
    }
    if let Some(v) = f.jwt_ttl {
        e.jwt_svid_ttl = v.as_secs().max(1);
    }
    if !f.dns_names.is_empty() {
        e.dns_names = f.dns_names;
    }
    if !f.federates_with.is_empty() {
        e.federates_with = f.federates_with;
    }
    if let Some(v) = f.hint {
        e.hint = v;
    }
}

async fn client(cmd: Command) -> anyhow::Result<ExitCode> {
    use admin::agents_client::AgentsClient;
    use admin::audit_client::AuditClient;
    use admin::authority_client::AuthorityClient;
    use admin::entries_client::EntriesClient;
    use admin::tokens_client::TokensClient;
    match cmd {
        Command::Run(_) | Command::Backup(_) | Command::Restore(_) => bail!("unreachable"),
        Command::Ci(command) => return ci::run(command).await,
        Command::Entry(EntryCommand::Create {
            conn,
            id,
            fields,
            output,
        }) => {
            let mut e = admin::Entry {
                id: id.unwrap_or_default(),
                ..Default::default()
            };
            apply_fields(&mut e, fields);
            let mut c = EntriesClient::new(channel(&conn).await?);
            let e = c
                .create_entry(admin::CreateEntryRequest { entry: Some(e) })
                .await
                .map_err(status_err)?
                .into_inner();
            print_entry(&e, output);
        }
        Command::Entry(EntryCommand::List {
            conn,
            parent_id,
            output,
        }) => {
            let mut c = EntriesClient::new(channel(&conn).await?);
            let r = c
                .list_entries(admin::ListEntriesRequest {
                    parent_id: parent_id.unwrap_or_default(),
                })
                .await
                .map_err(status_err)?
                .into_inner();
            match output {
                Output::Json => println!(
                    "{}",
                    serde_json::Value::Array(r.entries.iter().map(entry_json).collect())
                ),
                Output::Text => {
                    println!("Found {} entries", r.entries.len());
                    for e in &r.entries {
                        println!();
                        print!("{}", entry_text(e));
                    }
                }
            }
        }
        Command::Entry(EntryCommand::Show { conn, id, output }) => {
            let mut c = EntriesClient::new(channel(&conn).await?);
            let e = c
                .get_entry(admin::GetEntryRequest { id })
                .await
                .map_err(status_err)?
                .into_inner();
            print_entry(&e, output);
        }
        Command::Entry(EntryCommand::Update {
            conn,
            id,
            fields,
            output,
        }) => {
            let mut c = EntriesClient::new(channel(&conn).await?);
            let mut e = c
                .get_entry(admin::GetEntryRequest { id })
                .await
                .map_err(status_err)?
                .into_inner();
            apply_fields(&mut e, fields);
            let e = c
                .update_entry(admin::UpdateEntryRequest { entry: Some(e) })
                .await
                .map_err(status_err)?
                .into_inner();
            print_entry(&e, output);
        }
        Command::Entry(EntryCommand::Rotate { conn, id, reason }) => {
            let mut c = EntriesClient::new(channel(&conn).await?);
            let e = c
                .rotate_entry(admin::RotateEntryRequest { id, reason })
                .await
                .map_err(status_err)?
                .into_inner();
            println!(
                "Rotating entry {} ({}): revision {}; its agents replace the SVIDs now",
                e.id, e.spiffe_id, e.revision
            );
        }
        Command::Entry(EntryCommand::Delete { conn, id }) => {
            let mut c = EntriesClient::new(channel(&conn).await?);
            let e = c
                .delete_entry(admin::DeleteEntryRequest { id })
                .await
                .map_err(status_err)?
                .into_inner();
            println!("Deleted entry {}", e.id);
        }
        Command::Console(ConsoleCommand::Token { conn, ttl }) => {
            let mut c = admin::console_client::ConsoleClient::new(channel(&conn).await?);
            let r = c
                .create_login_token(admin::ConsoleLoginTokenRequest {
                    ttl: ttl.map_or(0, |d| d.as_secs().max(1)),
                })
                .await
                .map_err(status_err)?
                .into_inner();
            println!("Console: {}", r.address);
            println!("Login token: {}", r.token);
            println!("Expires at: {}", r.expires_at);
            println!("The session it opens lasts {}s.", r.session_ttl);
        }
        Command::Token(TokenCommand::Generate { conn, ttl }) => {
            let mut c = TokensClient::new(channel(&conn).await?);
            let r = c
                .generate_token(admin::GenerateTokenRequest {
                    ttl: ttl.map_or(0, |d| d.as_secs().max(1)),
                })
                .await
                .map_err(status_err)?
                .into_inner();
            println!("Token: {}", r.token);
            println!("Token ID: {}", r.id);
            println!("Expires at: {}", r.expires_at);
        }
        Command::Bundle(BundleCommand::Show { conn, format }) => {
            let mut c = AuthorityClient::new(channel(&conn).await?);
            let b = c
                .get_bundle(admin::GetBundleRequest {})
                .await
                .map_err(status_err)?
                .into_inner();
            match format {
                BundleFormat::Pem => print!("{}", b.pem),
                BundleFormat::Spiffe => {
                    let v: serde_json::Value = serde_json::from_str(&b.spiffe_json)
                        .context("server sent a malformed bundle")?;
                    println!("{}", serde_json::to_string_pretty(&v)?);
                }
            }
        }
        Command::X509(X509Command::Mint {
            conn,
            spiffe_id,
            ttl,
            dns_names,
            out_dir,
        }) => {
            let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
                .context("cannot generate a key")?;
            let params =
                rcgen::CertificateParams::new(Vec::<String>::new()).context("csr params")?;
            let csr = params
                .serialize_request(&key)
                .context("cannot build the CSR")?;
            let mut c = AuthorityClient::new(channel(&conn).await?);
            let r = c
                .mint_x509_svid(admin::MintX509SvidRequest {
                    spiffe_id,
                    csr: csr.der().to_vec(),
                    ttl: ttl.map_or(0, |d| d.as_secs().max(1)),
                    dns_names,
                })
                .await
                .map_err(status_err)?
                .into_inner();
            std::fs::create_dir_all(&out_dir)
                .with_context(|| format!("cannot create {}", out_dir.display()))?;
            let leaf = r.chain.first().context("server returned an empty chain")?;
            let certs =
                |ders: &[Vec<u8>]| files::pem("CERTIFICATE", ders.iter().map(Vec::as_slice));
            files::write_atomic(
                &out_dir.join("svid.pem"),
                files::pem("CERTIFICATE", [leaf.as_slice()]).as_bytes(),
                0o644,
            )?;
            files::write_atomic(
                &out_dir.join("chain.pem"),
                certs(&r.chain).as_bytes(),
                0o644,
            )?;
            files::write_atomic(
                &out_dir.join("bundle.pem"),
                certs(&r.bundle).as_bytes(),
                0o644,
            )?;
            let key_pem = zeroize::Zeroizing::new(key.serialize_pem());
            files::write_private(&out_dir.join("key.pem"), key_pem.as_bytes())?;
            println!("Serial: {}", r.serial);
            println!("Not after: {}", r.not_after);
            println!(
                "Wrote svid.pem, chain.pem, key.pem and bundle.pem to {}",
                out_dir.display()
            );
        }
        Command::Jwt(JwtCommand::Mint {
            conn,
            spiffe_id,
            audience,
            ttl,
        }) => {
            let mut c = AuthorityClient::new(channel(&conn).await?);
            let r = c
                .mint_jwt_svid(admin::MintJwtSvidRequest {
                    spiffe_id,
                    audience,
                    ttl: ttl.map_or(0, |d| d.as_secs().max(1)),
                })
                .await
                .map_err(status_err)?
                .into_inner();
            println!("{}", r.token);
        }
        Command::Agent(AgentCommand::List { conn, output }) => {
            let mut c = AgentsClient::new(channel(&conn).await?);
            let r = c
                .list_agents(admin::ListAgentsRequest {})
                .await
                .map_err(status_err)?
                .into_inner();
            match output {
                Output::Json => println!(
                    "{}",
                    serde_json::Value::Array(r.agents.iter().map(agent_json).collect())
                ),
                Output::Text => {
                    println!("Found {} agents", r.agents.len());
                    for a in &r.agents {
                        println!();
                        print!("{}", agent_text(a));
                    }
                }
            }
        }
        Command::Agent(AgentCommand::Show {
            conn,
            spiffe_id,
            output,
        }) => {
            let mut c = AgentsClient::new(channel(&conn).await?);
            let a = c
                .get_agent(admin::GetAgentRequest { spiffe_id })
                .await
                .map_err(status_err)?
                .into_inner();
            match output {
                Output::Json => println!("{}", agent_json(&a)),
                Output::Text => print!("{}", agent_text(&a)),
            }
        }
        Command::Agent(AgentCommand::Evict { conn, spiffe_id }) => {
            let mut c = AgentsClient::new(channel(&conn).await?);
            let a = c
                .evict_agent(admin::EvictAgentRequest { spiffe_id })
                .await
                .map_err(status_err)?
                .into_inner();
            println!("Evicted agent {}", a.spiffe_id);
        }
        Command::Agent(AgentCommand::Ban { conn, spiffe_id }) => {
            let mut c = AgentsClient::new(channel(&conn).await?);
            let a = c
                .ban_agent(admin::BanAgentRequest { spiffe_id })
                .await
                .map_err(status_err)?
                .into_inner();
            println!("Banned agent {}", a.spiffe_id);
        }
        Command::Agent(AgentCommand::Rotate {
            conn,
            spiffe_id,
            reason,
        }) => {
            let mut c = AgentsClient::new(channel(&conn).await?);
            let r = c
                .rotate_agent(admin::RotateAgentRequest { spiffe_id, reason })
                .await
                .map_err(status_err)?
                .into_inner();
            let id = r.agent.map(|a| a.spiffe_id).unwrap_or_default();
            println!(
                "Rotating agent {id}: its own SVID and {} entries' SVIDs are replaced now",
                r.entries
            );
        }
        Command::Ca(CaCommand::Status { conn, output }) => {
            let mut c = AuthorityClient::new(channel(&conn).await?);
            let s = c
                .status(admin::StatusRequest {})
                .await
                .map_err(status_err)?
                .into_inner();
            let keys: Vec<_> = s
                .keys
                .iter()
                .map(|k| {
                    serde_json::json!({"id": k.id, "kind": k.kind, "state": k.state, "server_id": k.server_id,
                        "not_before": k.not_before, "not_after": k.not_after, "tainted_at": k.tainted_at})
                })
                .collect();
            let taints: Vec<_> = s
                .taints
                .iter()
                .map(|t| {
                    serde_json::json!({"key_id": t.key_id, "tainted_at": t.tainted_at,
                        "remaining": t.remaining, "remaining_until": t.remaining_until,
                        "replaced": t.replaced,
                        "cleared_after_s": (t.cleared_after_s >= 0).then_some(t.cleared_after_s)})
                })
                .collect();
            match output {
                Output::Json => println!(
                    "{}",
                    serde_json::json!({"trust_domain": s.trust_domain, "server_id": s.server_id,
                        "datastore": s.datastore, "entries": s.entries, "keys": keys,
                        "bundle_sequence": s.bundle_sequence,
                        "agents_delivered": s.agents_delivered, "agents_live": s.agents_live,
                        "taints": taints})
                ),
                Output::Text => {
                    println!("Trust domain : {}", s.trust_domain);
                    println!("Server ID    : {}", s.server_id);
                    println!("Datastore    : {}", s.datastore);
                    println!("Entries      : {}", s.entries);
                    println!(
                        "Bundle       : sequence {}, delivered by {} of {} live agents",
                        s.bundle_sequence, s.agents_delivered, s.agents_live
                    );
                    for k in &s.keys {
                        println!(
                            "{:<18} {:<10} {:<28} server={} not_after={}{}",
                            k.kind,
                            k.state,
                            k.id,
                            k.server_id,
                            k.not_after,
                            if k.tainted_at > 0 {
                                format!(" TAINTED at {}", k.tainted_at)
                            } else {
                                String::new()
                            }
                        );
                    }
                    for t in &s.taints {
                        if t.cleared_after_s >= 0 {
                            println!(
                                "Taint {}: nothing it signed is left ({} re-issued, the last {} s after the taint)",
                                t.key_id, t.replaced, t.cleared_after_s
                            );
                        } else {
                            let now = meshid_api::unix_now();
                            println!(
                                "Taint {}: {} SVIDs it signed remain ({} re-issued); without re-issue the last expires in {} s",
                                t.key_id,
                                t.remaining,
                                t.replaced,
                                (t.remaining_until - now).max(0)
                            );
                        }
                    }
                }
            }
        }
        Command::Ca(CaCommand::Taint {
            conn,
            key_id,
            reason,
        }) => {
            let mut c = AuthorityClient::new(channel(&conn).await?);
            let k = c
                .taint_key(admin::TaintKeyRequest { key_id, reason })
                .await
                .map_err(status_err)?
                .into_inner();
            println!(
                "Tainted {} {} (server {}): a fresh key signs from now on; everything it signed is being re-issued (progress: meshid-ca ca status)",
                k.kind, k.id, k.server_id
            );
        }
        Command::Ca(CaCommand::Root {
            conn,
            output,
            command,
        }) => return root::run(command, channel(&conn).await?, output == Output::Json).await,
        Command::Svid {
            conn,
            output,
            command,
        } => return svid::run(command, channel(&conn).await?, output == Output::Json).await,
        Command::Policy {
            conn,
            output,
            command,
        } => return policy::run(command, channel(&conn).await?, output == Output::Json).await,
        Command::Federation {
            conn,
            output,
            command,
        } => return federation::run(command, channel(&conn).await?, output == Output::Json).await,
        Command::Apply { conn, output, args } => {
            return mesh::run(args, channel(&conn), output == Output::Json, false).await
        }
        Command::Plan { conn, output, args } => {
            return mesh::run(args, channel(&conn), output == Output::Json, true).await
        }
        Command::Audit(AuditCommand::List {
            kind,
            after,
            limit,
            output,
            conn,
        }) => {
            let mut c = AuditClient::new(channel(&conn).await?);
            let r = c
                .list(admin::ListAuditRequest {
                    after_seq: after,
                    limit,
                    kind_prefix: kind.unwrap_or_default(),
                })
                .await
                .map_err(status_err)?
                .into_inner();
            for rec in &r.records {
                let details: serde_json::Value =
                    serde_json::from_str(&rec.details).unwrap_or(serde_json::Value::Null);
                match output {
                    Output::Json => println!(
                        "{}",
                        serde_json::json!({"seq": rec.seq, "time": rec.time, "kind": rec.kind,
                            "actor": rec.actor, "details": details})
                    ),
                    Output::Text => println!(
                        "{:>6} {} {} by {} {}",
                        rec.seq,
                        humantime::format_rfc3339_seconds(
                            std::time::UNIX_EPOCH
                                + std::time::Duration::from_secs(
                                    u64::try_from(rec.time).unwrap_or(0)
                                )
                        ),
                        rec.kind,
                        rec.actor,
                        rec.details
                    ),
                }
            }
            if output == Output::Text && r.records.is_empty() {
                println!("no matching records after {after}");
            }
        }
        Command::Audit(AuditCommand::Verify {
            conn,
            export: Some(export),
            public_key,
            offline,
        }) => return audit::verify(&conn.socket, &export, public_key.as_deref(), offline).await,
        Command::Audit(AuditCommand::Verify { conn, .. }) => {
            let mut c = AuditClient::new(channel(&conn).await?);
            let r = c
                .verify(admin::VerifyAuditRequest {})
                .await
                .map_err(status_err)?
                .into_inner();
            if r.ok {
                println!("audit log OK: {} records verified", r.records);
            } else {
                println!(
                    "audit log TAMPERED: first bad record {}: {}",
                    r.first_bad_seq, r.reason
                );
                return Ok(ExitCode::FAILURE);
            }
        }
        Command::Healthcheck {
            ops_address,
            config,
        } => {
            let ops_address = match (ops_address, config) {
                (Some(a), _) => a,
                (None, Some(path)) => RawConfig::from_file(&path)?
                    .ops_address
                    .unwrap_or_else(|| meshid_ca::config::DEFAULT_OPS_ADDRESS.to_owned()),
                (None, None) => meshid_ca::config::DEFAULT_OPS_ADDRESS.to_owned(),
            };
            tokio::task::spawn_blocking(move || meshid_api::ops::healthcheck(&ops_address))
                .await??;
            println!("meshid-ca is healthy");
        }
    }
    Ok(ExitCode::SUCCESS)
}
