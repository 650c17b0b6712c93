//! `meshid-ca apply -f mesh.yaml` and `meshid-ca plan -f mesh.yaml`: declarative entries and
//! policy documents (see `meshid_ca::mesh` for the file, `meshid_ca::service::mesh` for what
//! the CA does with it).
//!
//! The file is read and checked here (file:line:column), then sent whole to the CA, which
//! plans and applies in one transaction and answers with the plan. Text output lists the
//! changes (`+` create, `~` update or adopt, `-` delete; a policy document with its diff) and
//! ends with what happened. `--output json` prints one object, a stable shape for CI:
//!
//! ```json
//! {"owner": "payments", "files": ["mesh.yaml"], "dry_run": true, "applied": false,
//!  "changed": true, "policy_revision": 3,
//!  "summary": {"create": 1, "update": 1, "adopt": 0, "delete": 0, "unchanged": 4},
//!  "changes": [{"kind": "entry", "action": "update", "id": "4f1c...",
//!               "spiffe_id": "spiffe://example.org/web", "parent_id": "spiffe://...",
//!               "selectors": ["unix:uid:1000"], "fields": ["x509_svid_ttl: 300 -> 600"],
//!               "diff": "", "declared_at": "mesh.yaml:4:5"}],
//!  "orphans": []}
//! ```
//!
//! `kind` is `entry` or `policy` (`id` is then the document's name, and `diff` its unified
//! diff); `action` is `create`, `update`, `adopt` or `delete`; `id` is empty for an entry a dry
//! run would create; `orphans` are what the owner holds that the file no longer declares, kept
//! because `--prune` was not given (as the deletions `--prune` would make). Exit status: 0 done
//! (or nothing to do), 1 refused (an invalid file, a conflict, the CA unreachable: nothing
//! changed); with `--detailed-exitcode`, 2 when the plan had changes.

use std::future::Future;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;
use meshid_api::admin;
use meshid_api::admin::mesh_client::MeshClient;
use meshid_ca::mesh::MAX_MESH_MESSAGE;
use tonic::transport::Channel;

#[derive(Args, Debug)]
pub struct MeshArgs {
    /// The mesh file, or a directory: every *.yaml and *.yml file directly in it, in name
    /// order, applied together (one owner).
    #[arg(long, short = 'f')]
    file: PathBuf,
    /// Also delete the entries and policy documents this file's owner holds that it no longer
    /// declares (never anything made by hand or by another owner).
    #[arg(long)]
    prune: bool,
    /// Take over the entries and policy documents made by hand that the file declares (they
    /// are refused otherwise; another owner's always are).
    #[arg(long)]
    adopt: bool,
    /// Print the plan; change nothing (what `meshid-ca plan` does).
    #[arg(long)]
    dry_run: bool,
    /// Exit 2 when the plan has changes (pending with --dry-run, made otherwise), 0 when the
    /// CA already matches the file.
    #[arg(long)]
    detailed_exitcode: bool,
    /// Why (recorded with the policy revision and in the audit log).
    #[arg(long, default_value = "")]
    reason: String,
}

/// Reads the mesh file, then (over `connect`) has the CA plan and, unless `dry_run`, apply
/// it; prints the plan.
pub async fn run(
    args: MeshArgs,
    connect: impl Future<Output = anyhow::Result<Channel>>,
    json: bool,
    dry_run: bool,
) -> anyhow::Result<ExitCode> {
    // The file first: a mistake in it is told without a CA.
    let mesh = meshid_ca::mesh::load(&args.file)?;
    let request = admin::ApplyMeshRequest {
        owner: mesh.owner.clone(),
        entries: mesh
            .entries
            .iter()
            .map(|e| admin::MeshEntry {
                entry: Some(meshid_ca::admin::spec_to_proto(&e.spec)),
                origin: e.at.clone(),
            })
            .collect(),
        policies: mesh
            .policies
            .iter()
            .map(|p| admin::MeshPolicy {
                name: p.name.clone(),
                text: p.text.clone(),
                origin: p.origin.clone(),
                line_offset: u32::try_from(p.line_offset).unwrap_or(u32::MAX),
                column_offset: u32::try_from(p.column_offset).unwrap_or(u32::MAX),
                declared_at: p.at.clone(),
            })
            .collect(),
        federations: mesh
            .federations
            .iter()
            .map(|f| admin::MeshFederation {
                trust_domain: f.trust_domain.clone(),
                endpoint_url: f.endpoint_url.clone(),
                profile: f.profile.clone(),
                endpoint_spiffe_id: f.endpoint_spiffe_id.clone(),
                bootstrap_bundle: match &f.bundle {
                    meshid_ca::mesh::FederationBundle::Text(t) => t.clone(),
                    _ => String::new(),
                },
                declared_at: f.at.clone(),
            })
            .collect(),
        prune: args.prune,
        dry_run: dry_run || args.dry_run,
        adopt: args.adopt,
        reason: args.reason,
    };
    // Refused here, with what to do, rather than by the transport after connecting.
    let size = prost::Message::encoded_len(&request);
    if size > MAX_MESH_MESSAGE {
        anyhow::bail!(
            "{}: the mesh is {} MiB to send, more than the {} MiB one apply carries: split it \
             between owners (one directory or file each); nothing was changed",
            args.file.display(),
            size >> 20,
            MAX_MESH_MESSAGE >> 20
        );
    }
    let mut client = MeshClient::new(connect.await?)
        .max_decoding_message_size(MAX_MESH_MESSAGE)
        .max_encoding_message_size(MAX_MESH_MESSAGE);
    let plan = client
        .apply(request)
        .await
        .map_err(|s| anyhow::anyhow!("{}", s.message()))?
        .into_inner();
    let files: Vec<String> = mesh.files.iter().map(|f| f.display().to_string()).collect();
    if json {
        println!("{}", plan_json(&mesh.owner, &files, &plan));
    } else {
        print!("{}", plan_text(&mesh.owner, &plan, args.prune));
    }
    Ok(if args.detailed_exitcode && !plan.changes.is_empty() {
        ExitCode::from(2)
    } else {
        ExitCode::SUCCESS
    })
}

fn count(plan: &admin::MeshPlan, action: &str) -> usize {
    plan.changes.iter().filter(|c| c.action == action).count()
}

fn change_json(c: &admin::MeshChange) -> serde_json::Value {
    serde_json::json!({
        "kind": c.kind,
        "action": c.action,
        "id": c.id,
        "spiffe_id": c.spiffe_id,
        "parent_id": c.parent_id,
        "selectors": c.selectors,
        "fields": c.fields,
        "diff": c.diff,
        "declared_at": c.declared_at,
    })
}

fn plan_json(owner: &str, files: &[String], plan: &admin::MeshPlan) -> serde_json::Value {
    serde_json::json!({
        "owner": owner,
        "files": files,
        "dry_run": plan.dry_run,
        "applied": plan.applied,
        "changed": !plan.changes.is_empty(),
        "policy_revision": plan.policy_revision,
        "summary": {
            "create": count(plan, "create"),
            "update": count(plan, "update"),
            "adopt": count(plan, "adopt"),
            "delete": count(plan, "delete"),
            "unchanged": plan.unchanged,
        },
        "changes": plan.changes.iter().map(change_json).collect::<Vec<_>>(),
        "orphans": plan.orphans.iter().map(change_json).collect::<Vec<_>>(),
    })
}

/// One line naming a change's object: `entry spiffe://... (parent ...) [selectors]` or
/// `policy NAME`.
fn object(c: &admin::MeshChange) -> String {
    if c.kind == "entry" {
        let id = if c.id.is_empty() {
            String::new()
        } else {
            format!(", id {}", c.id)
        };
        format!(
            "entry {} (parent {}{id}) [{}]",
            c.spiffe_id,
            c.parent_id,
            c.selectors.join(", ")
        )
    } else if c.kind == "federation" {
        format!("federation with {}", c.id)
    } else {
        format!("policy {}", c.id)
    }
}

fn plan_text(owner: &str, plan: &admin::MeshPlan, prune: bool) -> String {
    let mut out = String::new();
    for c in &plan.changes {
        let sign = match c.action.as_str() {
            "create" => "+",
            "delete" => "-",
            _ => "~",
        };
        let adopted = if c.action == "adopt" { " (adopt)" } else { "" };
        out.push_str(&format!("{sign} {}{adopted}\n", object(c)));
        for f in &c.fields {
            out.push_str(&format!("    {f}\n"));
        }
        for line in c.diff.lines() {
            out.push_str(&format!("    {line}\n"));
        }
    }
    if !plan.orphans.is_empty() && !prune {
        out.push_str(&format!(
            "{} object(s) owned by `{owner}` are no longer declared; kept (--prune deletes \
             them):\n",
            plan.orphans.len()
        ));
        for c in &plan.orphans {
            out.push_str(&format!("  {}\n", object(c)));
        }
    }
    let summary = format!(
        "{} to create, {} to update, {} to adopt, {} to delete",
        count(plan, "create"),
        count(plan, "update"),
        count(plan, "adopt"),
        count(plan, "delete")
    );
    let revision = match plan.policy_revision {
        0 => "no policy".to_owned(),
        n => format!("policy revision {n}"),
    };
    if plan.changes.is_empty() {
        out.push_str(&format!(
            "No changes. The mesh matches the file ({} unchanged; {revision}).\n",
            plan.unchanged
        ));
    } else if plan.applied {
        out.push_str(&format!(
            "Applied {} changes ({revision}).\n",
            plan.changes.len()
        ));
    } else {
        out.push_str(&format!(
            "Plan: {summary}. Dry run: nothing changed ({revision} in force).\n"
        ));
    }
    out
}
