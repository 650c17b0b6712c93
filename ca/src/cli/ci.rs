//! `meshid-ca ci exchange`: run in a CI job, exchanges the job's OIDC token (read from a file,
//! never from the command line) at the CA's exchange endpoint for a short-lived SVID. The key
//! is generated here and written only where asked (mode 0600); nothing secret is printed, except
//! with `--mask`, which prints GitHub Actions' `::add-mask::` line for the JWT-SVID so that the
//! runner hides it in every later log line.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use base64::Engine as _;
use clap::Subcommand;
use meshid_ca::federation::fetch::{https_request, web_client_config, WebRoots};

#[derive(Subcommand, Debug)]
pub enum CiCommand {
    /// Exchange this job's OIDC token for an X.509-SVID (and JWT-SVIDs with --jwt-audience).
    Exchange {
        /// The file holding the CI system's OIDC token (e.g. written from $CIRCLE_OIDC_TOKEN).
        #[arg(long)]
        token_file: PathBuf,
        /// The CA's bundle endpoint, e.g. https://ca.example.org:8443.
        #[arg(long)]
        url: String,
        /// PEM roots that the endpoint's certificate is verified against [default: the
        /// system's].
        #[arg(long)]
        ca_file: Option<PathBuf>,
        /// Where to write svid.pem (the chain), key.pem (0600), bundle.pem and jwt.token (0600).
        #[arg(long)]
        out: PathBuf,
        /// Also mint a JWT-SVID for this audience (repeatable).
        #[arg(long = "jwt-audience")]
        jwt_audiences: Vec<String>,
        /// Print `::add-mask::` for the JWT-SVID (GitHub Actions log masking).
        #[arg(long)]
        mask: bool,
    },
}

/// Runs a `ci` command.
pub async fn run(cmd: CiCommand) -> anyhow::Result<ExitCode> {
    let CiCommand::Exchange {
        token_file,
        url,
        ca_file,
        out,
        jwt_audiences,
        mask,
    } = cmd;
    let token = std::fs::read_to_string(&token_file)
        .with_context(|| format!("cannot read {}", token_file.display()))?;
    let token = zeroize::Zeroizing::new(token.trim().to_owned());
    let url: http::Uri = format!("{}/v1/ci/exchange", url.trim_end_matches('/'))
        .parse()
        .context("--url: not a URL")?;
    anyhow::ensure!(url.scheme_str() == Some("https"), "--url must be https://");
    let key = rcgen::KeyPair::generate().context("cannot generate a key")?;
    let csr = rcgen::CertificateParams::new(Vec::<String>::new())
        .and_then(|p| p.serialize_request(&key))
        .context("cannot build the CSR")?;
    let request = zeroize::Zeroizing::new(
        serde_json::json!({
            "token": *token,
            "csr": base64::engine::general_purpose::STANDARD.encode(csr.der()),
            "jwt_audiences": jwt_audiences,
        })
        .to_string(),
    );
    let roots = WebRoots::load(ca_file.as_deref())?;
    let config = web_client_config(&roots)?;
    let (status, body) = https_request(&url, config, Some(request.to_string()), 1 << 20).await?;
    let answer: serde_json::Value = serde_json::from_str(&body)
        .with_context(|| format!("the CA answered {status} with something else than JSON"))?;
    if status != 200 {
        anyhow::bail!(
            "refused ({status}, {}): {}",
            answer["error"].as_str().unwrap_or("?"),
            answer["message"].as_str().unwrap_or("")
        );
    }
    std::fs::create_dir_all(&out).with_context(|| format!("cannot create {}", out.display()))?;
    let text = |name: &str| answer[name].as_str().unwrap_or("").to_owned();
    let write_public = |name: &str, contents: &str| {
        std::fs::write(out.join(name), contents)
            .with_context(|| format!("cannot write {}", out.join(name).display()))
    };
    write_public("svid.pem", &text("x509_svid"))?;
    write_public("bundle.pem", &text("x509_bundle"))?;
    let key_pem = zeroize::Zeroizing::new(key.serialize_pem());
    meshid_api::files::write_private(&out.join("key.pem"), key_pem.as_bytes())
        .with_context(|| format!("cannot write {}", out.join("key.pem").display()))?;
    let jwt = zeroize::Zeroizing::new(text("jwt_svid"));
    if !jwt.is_empty() {
        meshid_api::files::write_private(&out.join("jwt.token"), jwt.as_bytes())
            .with_context(|| format!("cannot write {}", out.join("jwt.token").display()))?;
        if mask {
            println!("::add-mask::{}", *jwt);
        }
    }
    println!("SPIFFE ID  : {}", text("spiffe_id"));
    if let Some(exp) = answer["x509_svid_expires_at"].as_i64() {
        let at = std::time::UNIX_EPOCH + std::time::Duration::from_secs(exp.max(0) as u64);
        println!("Expires at : {}", humantime::format_rfc3339_seconds(at));
    }
    println!("Written to : {}", out.display());
    Ok(ExitCode::SUCCESS)
}
