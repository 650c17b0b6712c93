//! `meshid-ca backup` and `meshid-ca restore` (see `meshid_ca::backup`).

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::Args;
use meshid_ca::backup::{Protection, Target, Unlock};
use meshid_ca::config::{Config, ConfigError, RawConfig};

/// Which CA server: its configuration, with the overrides `run` takes too.
#[derive(Args, Debug)]
pub struct ServerArgs {
    /// TOML configuration file.
    #[arg(long, short)]
    config: Option<PathBuf>,
    /// Trust domain (overrides the file).
    #[arg(long)]
    trust_domain: Option<String>,
    /// Data directory (overrides the file).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// This server's name among the CA servers sharing one datastore (overrides the file;
    /// default ca-1). Each server of a group needs its own, kept across restarts: it names the
    /// server's intermediate and its key directory's owner.
    #[arg(long)]
    server_id: Option<String>,
    /// The datastore: "sqlite", "sqlite:///path" or a postgres:// URL (overrides the file).
    /// A password belongs in the file or in a PGPASSFILE, not on the command line.
    #[arg(long)]
    datastore: Option<String>,
}

impl ServerArgs {
    /// The file (or the defaults) with these overrides, not yet validated.
    pub fn raw(&self) -> Result<RawConfig, ConfigError> {
        let mut raw = match &self.config {
            Some(path) => RawConfig::from_file(path)?,
            None => RawConfig::default(),
        };
        if let Some(v) = &self.trust_domain {
            raw.trust_domain = Some(v.clone());
        }
        if let Some(v) = &self.data_dir {
            raw.data_dir = Some(v.clone());
        }
        if let Some(v) = &self.datastore {
            raw.datastore = Some(v.clone());
        }
        if let Some(v) = &self.server_id {
            raw.server_id = Some(v.clone());
        }
        Ok(raw)
    }

    fn config(&self) -> anyhow::Result<Config> {
        Ok(Config::try_from(self.raw()?)?)
    }
}

/// `meshid-ca backup`.
#[derive(Args, Debug)]
pub struct BackupArgs {
    #[command(flatten)]
    server: ServerArgs,
    /// Where to write the backup (mode 0600; replaced once complete).
    #[arg(long)]
    out: PathBuf,
    /// Encrypt with the passphrase in this file (mode 0600, first line; age with scrypt).
    #[arg(
        long,
        conflicts_with = "recipient",
        required_unless_present = "recipient"
    )]
    passphrase_file: Option<PathBuf>,
    /// Encrypt to this age recipient (`age1...`; repeat for several): any of their identity
    /// files decrypts it.
    #[arg(long)]
    recipient: Vec<String>,
}

/// `meshid-ca restore`.
#[derive(Args, Debug)]
pub struct RestoreArgs {
    /// The backup file.
    file: PathBuf,
    #[command(flatten)]
    server: ServerArgs,
    /// The passphrase file it was made with.
    #[arg(
        long,
        conflicts_with = "identity",
        required_unless_present = "identity"
    )]
    passphrase_file: Option<PathBuf>,
    /// An age identity file (`AGE-SECRET-KEY-1...`, mode 0600) of one of its recipients.
    #[arg(long)]
    identity: Option<PathBuf>,
    /// Read and check the backup only; write nothing.
    #[arg(long)]
    check: bool,
}

/// Runs `meshid-ca backup`.
pub async fn backup(args: BackupArgs) -> anyhow::Result<ExitCode> {
    let config = args.server.config()?;
    let protection = match &args.passphrase_file {
        Some(p) => Protection::Passphrase(meshid_ca::backup::passphrase_file(p)?),
        None => Protection::Recipients(
            args.recipient
                .iter()
                .map(|r| {
                    r.parse::<age::x25519::Recipient>()
                        .map_err(|e| anyhow::anyhow!("--recipient {r}: {e}"))
                })
                .collect::<anyhow::Result<_>>()?,
        ),
    };
    // As it is: a backup neither creates a datastore (a mistyped path is an error, not an
    // empty backup) nor migrates one.
    let store = meshid_ca::store::sql::SqlStore::open_unmigrated(config.datastore.as_str()).await?;
    let version = store.schema_version().await?;
    if version != meshid_ca::store::sql::SCHEMA_VERSION {
        anyhow::bail!(
            "the datastore is at schema version {version}, this meshid-ca's is {}: back it up with the meshid-ca that runs it",
            meshid_ca::store::sql::SCHEMA_VERSION
        );
    }
    let header =
        meshid_ca::backup::header(&store, config.trust_domain.as_str(), &config.server_id).await?;
    let counts = meshid_ca::backup::backup(
        &store,
        &config.data_dir.join("keys"),
        header,
        &args.out,
        protection,
    )
    .await?;
    store.close().await;
    println!(
        "backup written to {}: {} tables, {} rows, {} key files of {} (server {}), encrypted",
        args.out.display(),
        counts.tables,
        counts.rows,
        counts.keys,
        config.trust_domain,
        config.server_id
    );
    Ok(ExitCode::SUCCESS)
}

fn unlock(passphrase: Option<&Path>, identity: Option<&Path>) -> anyhow::Result<Unlock> {
    Ok(match (passphrase, identity) {
        (Some(p), _) => Unlock::Passphrase(meshid_ca::backup::passphrase_file(p)?),
        (None, Some(i)) => Unlock::Identities(meshid_ca::backup::identity_file(i)?),
        (None, None) => anyhow::bail!("give --passphrase-file or --identity"),
    })
}

/// Runs `meshid-ca restore`.
pub async fn restore(args: RestoreArgs) -> anyhow::Result<ExitCode> {
    let unlock = unlock(args.passphrase_file.as_deref(), args.identity.as_deref())?;
    if args.check {
        let (h, c) = meshid_ca::backup::inspect(&args.file, &unlock)?;
        println!(
            "backup OK: {} (server {}, {}, schema {}), made {}: {} tables, {} rows, {} key files",
            h.trust_domain,
            h.server_id,
            h.backend,
            h.schema_version,
            rfc3339(h.created_at),
            c.tables,
            c.rows,
            c.keys
        );
        return Ok(ExitCode::SUCCESS);
    }
    let config = args.server.config()?;
    let (h, c) = meshid_ca::backup::restore(
        &args.file,
        &unlock,
        Target {
            datastore: config.datastore.as_str(),
            data_dir: &config.data_dir,
            trust_domain: config.trust_domain.as_str(),
        },
    )
    .await?;
    println!(
        "restored {} (server {}) made {}: {} tables, {} rows, {} key files into {} and {}",
        h.trust_domain,
        h.server_id,
        rfc3339(h.created_at),
        c.tables,
        c.rows,
        c.keys,
        config.data_dir.display(),
        meshid_ca::config::redact_url(config.datastore.as_str())
    );
    if h.server_id != config.server_id {
        println!(
            "note: the backup is of server {}, this configuration's server_id is {}: run it as {} so that it uses the restored keys",
            h.server_id, config.server_id, h.server_id
        );
    }
    Ok(ExitCode::SUCCESS)
}

fn rfc3339(time: i64) -> String {
    humantime::format_rfc3339_seconds(
        std::time::UNIX_EPOCH + std::time::Duration::from_secs(u64::try_from(time).unwrap_or(0)),
    )
    .to_string()
}
