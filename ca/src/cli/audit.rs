//! `meshid-ca audit verify --export FILE`: an exported audit trail checked on its own (no CA
//! needed), then the CA's own chain checked against it.

use std::path::Path;
use std::process::ExitCode;

use meshid_api::admin;
use meshid_api::admin::audit_client::AuditClient;
use meshid_ca::audit::export::{compare_with_ca, verify_export};

/// Checks the export at `path` (with `public_key` pinned when given) and, unless `offline`,
/// the CA at `socket` against it. Exit 0 when both hold, 1 when either does not.
pub async fn verify(
    socket: &Path,
    path: &Path,
    public_key: Option<&Path>,
    offline: bool,
) -> anyhow::Result<ExitCode> {
    use anyhow::Context as _;
    let pinned = match public_key {
        Some(p) => Some(
            meshid_ca::audit::checkpoint::parse_public_key_pem(
                &std::fs::read(p).with_context(|| format!("cannot read {}", p.display()))?,
            )
            .map_err(|e| anyhow::anyhow!("{}: {e}", p.display()))?,
        ),
        None => None,
    };
    let file =
        std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let summary = match verify_export(std::io::BufReader::new(file), pinned.as_ref()) {
        Ok(s) => s,
        Err(e) => {
            println!("export TAMPERED or damaged: {}: {e}", path.display());
            return Ok(ExitCode::FAILURE);
        }
    };
    if summary.records == 0 {
        println!(
            "export EMPTY: {} holds no audit record (is it the right file?)",
            path.display()
        );
        return Ok(ExitCode::FAILURE);
    }
    let keys = summary
        .key_ids
        .iter()
        .cloned()
        .collect::<Vec<_>>()
        .join(", ");
    println!(
        "export OK: {} records (seq {}..{}), {} checkpoints{}{}",
        summary.records,
        summary.first_seq,
        summary.last_seq,
        summary.checkpoints,
        match summary.last_checkpoint {
            Some((seq, time)) => format!(", the last at seq {seq} ({})", rfc3339(time)),
            None => String::new(),
        },
        if keys.is_empty() {
            String::new()
        } else if pinned.is_some() {
            format!(", signed by the pinned key {keys}")
        } else {
            format!(", signed by key {keys} (not pinned: pass --public-key)")
        },
    );
    if summary.checkpoints == 0 {
        println!("warning: no checkpoint in the export: its records are not signed");
    } else {
        if pinned.is_none() {
            println!("warning: UNAUTHENTICATED (no --public-key): the checkpoints verify, but with the key they carry; whoever could rewrite the file could sign with a key of their own. Pin the CA's key (audit-checkpoint.key.pub) to know they are the CA's");
        }
        if summary.unsigned_tail > 0 {
            println!(
                "warning: the last {} records follow the last checkpoint: not signed yet (a checkpoint follows each interval)",
                summary.unsigned_tail
            );
        }
    }
    if offline {
        return Ok(ExitCode::SUCCESS);
    }

    // The CA's chain: its own verification, then record by record against the export.
    let mut c = AuditClient::new(meshid_api::client::connect_unix(socket).await?);
    let own = c
        .verify(admin::VerifyAuditRequest {})
        .await
        .map_err(|s| anyhow::anyhow!("{}", s.message()))?
        .into_inner();
    if !own.ok {
        println!(
            "the CA's audit log TAMPERED: first bad record {}: {}",
            own.first_bad_seq, own.reason
        );
        return Ok(ExitCode::FAILURE);
    }
    let mut ca = Vec::new();
    let mut after = (summary.first_seq - 1).max(0);
    let mut ca_head = after;
    while after < summary.last_seq {
        let page = c
            .list(admin::ListAuditRequest {
                after_seq: after,
                limit: 1000,
                kind_prefix: String::new(),
            })
            .await
            .map_err(|s| anyhow::anyhow!("{}", s.message()))?
            .into_inner();
        if page.records.is_empty() {
            break;
        }
        for r in &page.records {
            let hash: [u8; 32] = r.hash.as_slice().try_into().map_err(|_| {
                anyhow::anyhow!("the CA sent no record hashes: it is older than this CLI")
            })?;
            ca.push((r.seq, hash));
            ca_head = r.seq;
        }
        after = page.next_after_seq;
    }
    match compare_with_ca(&summary, ca, ca_head) {
        None => {
            println!(
                "the CA's audit log OK: {} records, and each of the {} exported is in it unchanged",
                own.records, summary.records
            );
            Ok(ExitCode::SUCCESS)
        }
        Some((seq, fault)) => {
            println!(
                "the CA's audit log REWRITTEN since it was exported: record {seq}: {}",
                match fault {
                    meshid_ca::audit::AuditFault::HashMismatch =>
                        "differs from the exported one (it, or a record before it, was edited, removed or re-hashed)".to_owned(),
                    meshid_ca::audit::AuditFault::HeadMismatch =>
                        format!("is missing: the CA's log ends at {ca_head} (truncated)"),
                    other => other.to_string(),
                }
            );
            Ok(ExitCode::FAILURE)
        }
    }
}

fn rfc3339(time: i64) -> String {
    humantime::format_rfc3339_seconds(
        std::time::UNIX_EPOCH + std::time::Duration::from_secs(u64::try_from(time).unwrap_or(0)),
    )
    .to_string()
}
