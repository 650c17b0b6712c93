//! `meshid-ca federation create | list | show | delete`: relationships with other trust
//! domains (see `meshid_ca::federation`).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Subcommand;
use meshid_api::admin;
use meshid_api::admin::federation_client::FederationClient;
use tonic::transport::Channel;

#[derive(Subcommand, Debug)]
pub enum FederationCommand {
    /// Federate with another trust domain: fetch its bundle from its bundle endpoint (at the
    /// endpoint's refresh hint) and hand it to the workloads whose entries federate with it.
    Create {
        /// The other trust domain, e.g. partner.org.
        #[arg(long)]
        trust_domain: String,
        /// Its bundle endpoint, e.g. https://partner.org:8443.
        #[arg(long)]
        endpoint_url: String,
        /// How the endpoint authenticates: https_spiffe (an SVID of its trust domain, checked
        /// against --bundle-file, then against each bundle fetched) or https_web (a Web PKI
        /// certificate for the URL's host).
        #[arg(long)]
        profile: String,
        /// https_spiffe: the SPIFFE ID the endpoint presents (a meshid CA's is
        /// spiffe://<trust-domain>/meshid/server).
        #[arg(long, default_value = "")]
        endpoint_spiffe_id: String,
        /// The trust domain's SPIFFE bundle (JWKS), checked out of band (e.g. the output of its
        /// `meshid-ca bundle show --format spiffe`): required for https_spiffe.
        #[arg(long)]
        bundle_file: Option<PathBuf>,
        /// Why (recorded in the audit log).
        #[arg(long, default_value = "")]
        reason: String,
    },
    /// Every relationship: endpoint, bundle held, refresh state.
    List,
    /// One relationship.
    Show {
        /// The federated trust domain.
        trust_domain: String,
    },
    /// Stop federating: the bundle is deleted and agents stop handing it out at once.
    Delete {
        /// The federated trust domain.
        trust_domain: String,
        /// Why (recorded in the audit log).
        #[arg(long, default_value = "")]
        reason: String,
    },
}

fn when(unix: i64) -> String {
    if unix <= 0 {
        return "never".to_owned();
    }
    humantime::format_rfc3339_seconds(
        std::time::UNIX_EPOCH + std::time::Duration::from_secs(u64::try_from(unix).unwrap_or(0)),
    )
    .to_string()
}

fn relationship_json(r: &admin::FederationRelationship) -> serde_json::Value {
    serde_json::json!({
        "trust_domain": r.trust_domain,
        "endpoint_url": r.endpoint_url,
        "profile": r.profile,
        "endpoint_spiffe_id": r.endpoint_spiffe_id,
        "owner": r.owner,
        "created_at": r.created_at,
        "bundle": {
            "sequence": r.bundle_sequence,
            "updated_at": r.bundle_updated_at,
            "x509_authorities": r.x509_authorities,
            "jwt_authorities": r.jwt_authorities,
            "refresh_hint": r.refresh_hint,
        },
        "refresh": {
            "last_attempt": r.last_attempt,
            "last_success": r.last_success,
            "last_error": r.last_error,
            "next_attempt": r.next_attempt,
        },
    })
}

fn relationship_text(r: &admin::FederationRelationship) -> String {
    let endpoint = if r.endpoint_spiffe_id.is_empty() {
        r.profile.clone()
    } else {
        format!("{} as {}", r.profile, r.endpoint_spiffe_id)
    };
    let bundle = if r.bundle_updated_at == 0 {
        "none yet (nothing of this trust domain is trusted until a fetch succeeds)".to_owned()
    } else {
        format!(
            "sequence {}, {} X.509 and {} JWT authorities, stored {}, refresh hint {}s",
            r.bundle_sequence,
            r.x509_authorities,
            r.jwt_authorities,
            when(r.bundle_updated_at),
            r.refresh_hint
        )
    };
    let mut s = format!(
        "Trust domain : {}\nEndpoint     : {} ({endpoint})\nBundle       : {bundle}\nLast fetch   : {}\nNext fetch   : {}\n",
        r.trust_domain,
        r.endpoint_url,
        when(r.last_success),
        when(r.next_attempt),
    );
    if !r.last_error.is_empty() {
        s.push_str(&format!("Last error   : {}\n", r.last_error));
    }
    if !r.owner.is_empty() {
        s.push_str(&format!("Owner        : {}\n", r.owner));
    }
    s
}

/// Runs one federation command over the admin API.
pub async fn run(cmd: FederationCommand, channel: Channel, json: bool) -> anyhow::Result<ExitCode> {
    let mut c = FederationClient::new(channel);
    let err = |s: tonic::Status| anyhow::anyhow!("{}", s.message());
    let print = |r: &admin::FederationRelationship| {
        if json {
            println!("{}", relationship_json(r));
        } else {
            print!("{}", relationship_text(r));
        }
    };
    match cmd {
        FederationCommand::Create {
            trust_domain,
            endpoint_url,
            profile,
            endpoint_spiffe_id,
            bundle_file,
            reason,
        } => {
            let bootstrap_bundle = match &bundle_file {
                Some(path) => std::fs::read_to_string(path)
                    .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", path.display()))?,
                None => String::new(),
            };
            let r = c
                .create(admin::CreateFederationRequest {
                    trust_domain,
                    endpoint_url,
                    profile,
                    endpoint_spiffe_id,
                    bootstrap_bundle,
                    reason,
                })
                .await
                .map_err(err)?
                .into_inner();
            print(&r);
        }
        FederationCommand::List => {
            let list = c
                .list(admin::ListFederationsRequest {})
                .await
                .map_err(err)?
                .into_inner()
                .relationships;
            if json {
                let all: Vec<_> = list.iter().map(relationship_json).collect();
                println!("{}", serde_json::Value::Array(all));
            } else if list.is_empty() {
                println!("No federation relationships.");
            } else {
                for (i, r) in list.iter().enumerate() {
                    if i > 0 {
                        println!();
                    }
                    print!("{}", relationship_text(r));
                }
            }
        }
        FederationCommand::Show { trust_domain } => {
            let r = c
                .get(admin::GetFederationRequest { trust_domain })
                .await
                .map_err(err)?
                .into_inner();
            print(&r);
        }
        FederationCommand::Delete {
            trust_domain,
            reason,
        } => {
            let r = c
                .delete(admin::DeleteFederationRequest {
                    trust_domain,
                    reason,
                })
                .await
                .map_err(err)?
                .into_inner();
            if json {
                println!("{}", relationship_json(&r));
            } else {
                println!(
                    "Deleted the federation relationship with {}.",
                    r.trust_domain
                );
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
