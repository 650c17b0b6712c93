//! `meshid-ca svid revoke | revocations | crl`: revocation of X.509 certificates and the CRLs
//! the CA signs over them.

use std::process::ExitCode;

use clap::Subcommand;
use meshid_api::admin;
use meshid_api::admin::authority_client::AuthorityClient;
use tonic::transport::Channel;

#[derive(Subcommand, Debug)]
pub enum SvidCommand {
    /// Revoke X.509 certificates: one SVID by serial, every unexpired SVID of a SPIFFE ID, or an
    /// intermediate (tainted too, so that what it signed is re-issued). The CA signs a CRL per
    /// issuer and pushes it to every agent, workload and proxy; proxies refuse the certificates
    /// in new handshakes and close connections that use them. Holders get fresh SVIDs.
    Revoke {
        /// The certificate's serial number (hex; colons and case ignored).
        #[arg(long, conflicts_with_all = ["spiffe_id", "key"], required_unless_present_any = ["spiffe_id", "key"])]
        serial: Option<String>,
        /// Every unexpired X.509-SVID issued to this SPIFFE ID.
        #[arg(long, conflicts_with = "key")]
        spiffe_id: Option<String>,
        /// An intermediate's key id (from `meshid-ca ca status`).
        #[arg(long)]
        key: Option<String>,
        /// Why (recorded in the audit log and with each revocation).
        #[arg(long, default_value = "")]
        reason: String,
    },
    /// The revocations in force (certificates not yet expired) and the CRLs served.
    Revocations,
    /// Print the CRLs served, PEM (for openssl and other relying parties).
    Crl,
}

fn revocation_json(r: &admin::Revocation) -> serde_json::Value {
    serde_json::json!({
        "serial": r.serial,
        "issuer_id": r.issuer_id,
        "spiffe_id": r.spiffe_id,
        "kind": r.kind,
        "not_after": r.not_after,
        "revoked_at": r.revoked_at,
        "reason": r.reason,
        "actor": r.actor,
    })
}

/// Runs one svid command over the admin API.
pub async fn run(cmd: SvidCommand, channel: Channel, json: bool) -> anyhow::Result<ExitCode> {
    let mut c = AuthorityClient::new(channel);
    let err = |s: tonic::Status| anyhow::anyhow!("{}", s.message());
    match cmd {
        SvidCommand::Revoke {
            serial,
            spiffe_id,
            key,
            reason,
        } => {
            let r = c
                .revoke_svid(admin::RevokeSvidRequest {
                    serial: serial.unwrap_or_default(),
                    spiffe_id: spiffe_id.unwrap_or_default(),
                    key_id: key.unwrap_or_default(),
                    reason,
                })
                .await
                .map_err(err)?
                .into_inner();
            if json {
                println!(
                    "{}",
                    serde_json::json!({
                        "revoked": r.revoked.iter().map(revocation_json).collect::<Vec<_>>(),
                        "already_revoked": r.already_revoked,
                    })
                );
            } else {
                for v in &r.revoked {
                    println!(
                        "Revoked {} serial {} (issuer {}, expires {})",
                        v.spiffe_id, v.serial, v.issuer_id, v.not_after
                    );
                }
                if r.already_revoked > 0 {
                    println!("{} already revoked", r.already_revoked);
                }
                println!("The CRLs are on their way to every agent, workload and proxy; holders get fresh SVIDs.");
            }
        }
        SvidCommand::Revocations => {
            let r = c
                .list_revocations(admin::ListRevocationsRequest {})
                .await
                .map_err(err)?
                .into_inner();
            if json {
                println!(
                    "{}",
                    serde_json::json!({
                        "revocations": r.revocations.iter().map(revocation_json).collect::<Vec<_>>(),
                        "crls": r.crls.iter().map(|c| serde_json::json!({
                            "issuer_id": c.issuer_id,
                            "number": c.number,
                            "this_update": c.this_update,
                            "entries": c.entries,
                        })).collect::<Vec<_>>(),
                    })
                );
            } else {
                println!(
                    "{} revoked certificates not yet expired",
                    r.revocations.len()
                );
                for v in &r.revocations {
                    println!(
                        "  {} serial {} issuer {} expires {} revoked {} by {}: {}",
                        v.spiffe_id,
                        v.serial,
                        v.issuer_id,
                        v.not_after,
                        v.revoked_at,
                        v.actor,
                        v.reason
                    );
                }
                for crl in &r.crls {
                    println!(
                        "CRL of {}: number {}, {} entries, signed at {}",
                        crl.issuer_id, crl.number, crl.entries, crl.this_update
                    );
                }
            }
        }
        SvidCommand::Crl => {
            let r = c
                .list_revocations(admin::ListRevocationsRequest {})
                .await
                .map_err(err)?
                .into_inner();
            for crl in &r.crls {
                print!(
                    "{}",
                    meshid_api::files::pem("X509 CRL", [crl.der.as_slice()])
                );
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
