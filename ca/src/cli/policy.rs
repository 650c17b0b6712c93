//! `meshid-ca policy apply | delete | show | history | rollback`: the central policy.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Subcommand;
use meshid_api::admin;
use meshid_api::admin::policy_client::PolicyClient;
use tonic::transport::Channel;

#[derive(Subcommand, Debug)]
pub enum PolicyCommand {
    /// Set a named policy document from FILE (meshid-policy YAML, checked before anything
    /// changes: an invalid file is refused with file:line:column). A new revision of the whole
    /// policy, recorded with who, why and the diff; applying the same text again changes
    /// nothing.
    Apply {
        /// The policy file.
        file: PathBuf,
        /// The document's name [default: the file's `name:`, else its stem].
        #[arg(long)]
        name: Option<String>,
        /// Print the diff against the revision in force; change nothing.
        #[arg(long)]
        dry_run: bool,
        /// Why (recorded with the revision and in the audit log).
        #[arg(long, default_value = "")]
        reason: String,
    },
    /// Remove a named document from the policy (a new revision).
    Delete {
        name: String,
        #[arg(long)]
        dry_run: bool,
        #[arg(long, default_value = "")]
        reason: String,
    },
    /// The documents in force, or at an earlier revision.
    Show {
        /// A revision number [default: the newest].
        #[arg(long)]
        revision: Option<u64>,
        /// Only this document (its YAML, as applied).
        #[arg(long)]
        name: Option<String>,
    },
    /// Every revision: who, when, what, why.
    History,
    /// Make a new revision with the documents of revision N (history is kept).
    Rollback {
        revision: u64,
        #[arg(long)]
        dry_run: bool,
        #[arg(long, default_value = "")]
        reason: String,
    },
}

/// The document name a file gets by default: its top-level `name:` if it has one, else its
/// stem, lowercased.
fn default_name(file: &std::path::Path, text: &str) -> String {
    let declared = text.lines().find_map(|l| {
        let v = l.strip_prefix("name:")?.trim();
        let v = v.split(" #").next().unwrap_or(v).trim();
        let v = v.trim_matches(|c| c == '"' || c == '\'');
        (!v.is_empty()).then(|| v.to_owned())
    });
    declared.unwrap_or_else(|| {
        file.file_stem()
            .map(|s| s.to_string_lossy().to_lowercase())
            .unwrap_or_default()
    })
}

fn print_change(c: &admin::PolicyChange, json: bool) {
    if json {
        println!(
            "{}",
            serde_json::json!({"revision": c.revision, "changed": c.changed, "diff": c.diff,
                "dry_run": c.dry_run})
        );
        return;
    }
    print!("{}", c.diff);
    match (c.changed, c.dry_run) {
        (false, _) => println!("No change: revision {} stays in force.", c.revision),
        (true, true) => println!(
            "Dry run: nothing changed (revision {} is in force).",
            c.revision
        ),
        (true, false) => println!("Policy revision {} is in force.", c.revision),
    }
}

fn revision_json(r: &admin::PolicyRevision) -> serde_json::Value {
    serde_json::json!({
        "revision": r.revision,
        "created_at": r.created_at,
        "author": r.author,
        "reason": r.reason,
        "action": r.action,
        "subject": r.subject,
        "documents": r.documents.iter().map(|d| serde_json::json!({"name": d.name, "text": d.text, "owner": d.owner})).collect::<Vec<_>>(),
    })
}

fn when(unix: i64) -> String {
    humantime::format_rfc3339_seconds(
        std::time::UNIX_EPOCH + std::time::Duration::from_secs(u64::try_from(unix).unwrap_or(0)),
    )
    .to_string()
}

/// Runs one policy command over the admin API.
pub async fn run(cmd: PolicyCommand, channel: Channel, json: bool) -> anyhow::Result<ExitCode> {
    let mut c = PolicyClient::new(channel);
    let err = |s: tonic::Status| anyhow::anyhow!("{}", s.message());
    match cmd {
        PolicyCommand::Apply {
            file,
            name,
            dry_run,
            reason,
        } => {
            let text = std::fs::read_to_string(&file)
                .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", file.display()))?;
            let name = name.unwrap_or_else(|| default_name(&file, &text));
            let change = c
                .apply(admin::ApplyPolicyRequest {
                    name,
                    text,
                    origin: file.display().to_string(),
                    reason,
                    dry_run,
                })
                .await
                .map_err(err)?
                .into_inner();
            print_change(&change, json);
        }
        PolicyCommand::Delete {
            name,
            dry_run,
            reason,
        } => {
            let change = c
                .delete(admin::DeletePolicyRequest {
                    name,
                    reason,
                    dry_run,
                })
                .await
                .map_err(err)?
                .into_inner();
            print_change(&change, json);
        }
        PolicyCommand::Rollback {
            revision,
            dry_run,
            reason,
        } => {
            let change = c
                .rollback(admin::RollbackPolicyRequest {
                    revision,
                    reason,
                    dry_run,
                })
                .await
                .map_err(err)?
                .into_inner();
            print_change(&change, json);
        }
        PolicyCommand::Show { revision, name } => {
            let r = c
                .show(admin::ShowPolicyRequest {
                    revision: revision.unwrap_or(0),
                })
                .await
                .map_err(err)?
                .into_inner();
            if let Some(name) = name {
                let Some(doc) = r.documents.iter().find(|d| d.name == name) else {
                    anyhow::bail!("revision {} has no policy document {name:?}", r.revision);
                };
                if json {
                    println!(
                        "{}",
                        serde_json::json!({"revision": r.revision, "name": doc.name, "text": doc.text})
                    );
                } else {
                    print!("{}", doc.text);
                }
            } else if json {
                println!("{}", revision_json(&r));
            } else {
                println!(
                    "Policy revision {} ({} {} by {} at {}{})",
                    r.revision,
                    r.action,
                    r.subject,
                    r.author,
                    when(r.created_at),
                    if r.reason.is_empty() {
                        String::new()
                    } else {
                        format!(": {}", r.reason)
                    }
                );
                for d in &r.documents {
                    if d.owner.is_empty() {
                        println!("\n# ---- {} ----", d.name);
                    } else {
                        println!(
                            "\n# ---- {} (owner {}: meshid-ca apply) ----",
                            d.name, d.owner
                        );
                    }
                    print!("{}", d.text);
                    if !d.text.ends_with('\n') {
                        println!();
                    }
                }
            }
        }
        PolicyCommand::History => {
            let h = c
                .history(admin::PolicyHistoryRequest {})
                .await
                .map_err(err)?
                .into_inner();
            if json {
                println!(
                    "{}",
                    serde_json::Value::Array(h.revisions.iter().map(revision_json).collect())
                );
            } else if h.revisions.is_empty() {
                println!("No policy has been applied yet.");
            } else {
                println!("REVISION  WHEN                  ACTION    SUBJECT  AUTHOR  REASON");
                for r in &h.revisions {
                    println!(
                        "{:<9} {:<21} {:<9} {} {} {}",
                        r.revision,
                        when(r.created_at),
                        r.action,
                        r.subject,
                        r.author,
                        r.reason
                    );
                }
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
