//! Attacks from the security review (issue 10), replayed against the real `meshid-ca` and
//! `meshid-agent`: each test performs the attack as the review did and checks that it no
//! longer works.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::Path;
use std::time::{Duration, Instant};

use meshid_api::workload::spiffe_workload_api_client::SpiffeWorkloadApiClient;
use meshid_api::workload::JwtsvidRequest;
use meshid_tests::{ca_cli, Agent, Ca};
use tonic::transport::Channel;

/// A Workload API request with the security header.
fn with_header<T>(message: T) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request
        .metadata_mut()
        .insert("workload.spiffe.io", "true".parse().unwrap());
    request
}

/// Octets of everything under `dir` (the CA's database, its WAL and its keys).
fn du(dir: &Path) -> u64 {
    let mut total = 0;
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        let meta = entry.metadata().unwrap();
        total += if meta.is_dir() {
            du(&entry.path())
        } else {
            meta.len()
        };
    }
    total
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .unwrap()
        .parse()
        .unwrap()
}

async fn fetch_jwt(
    client: &mut SpiffeWorkloadApiClient<Channel>,
    audience: Vec<String>,
) -> Result<usize, tonic::Status> {
    client
        .fetch_jwtsvid(with_header(JwtsvidRequest {
            audience,
            spiffe_id: String::new(),
        }))
        .await
        .map(|r| r.into_inner().svids.len())
}

/// Item 4: any workload with any identity sent FetchJWTSVID 40 times with 2,500 audiences of
/// 1,000 bytes; the CA's database grew 101 MiB in audit records and the agent 520 MB.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwt_audiences_are_bounded_and_mints_rate_limited() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::start(dir.path(), &[]);
    let (token, agent_id) = ca.join_token();
    let agent = Agent::start(dir.path(), &ca, &token);
    ca.entry_for_this_uid("web", "spiffe://example.org/web", &agent_id, &[]);
    let channel = meshid_api::client::connect_unix(&agent.socket)
        .await
        .unwrap();
    let mut client = SpiffeWorkloadApiClient::new(channel).max_decoding_message_size(64 << 20);
    // Wait for the identity.
    let deadline = Instant::now() + Duration::from_secs(30);
    while fetch_jwt(&mut client, vec!["warm".into()]).await.is_err() {
        assert!(Instant::now() < deadline, "no JWT-SVID for the workload");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let ca_before = du(&dir.path().join("ca"));
    let rss_before = rss_kib(agent.proc.id());
    let huge: Vec<String> = (0..2500).map(|i| format!("{i:0>1000}")).collect();
    for _ in 0..40 {
        let err = fetch_jwt(&mut client, huge.clone()).await.unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");
        assert!(
            err.message().contains("2500 audience values; at most 16"),
            "{}",
            err.message()
        );
    }
    // The bounds themselves: 16 values of 256 bytes pass, one more value or byte does not.
    let max: Vec<String> = (0..16).map(|i| format!("{i:0>256}")).collect();
    assert_eq!(fetch_jwt(&mut client, max.clone()).await.unwrap(), 1);
    let mut more = max.clone();
    more.push("x".into());
    let err = fetch_jwt(&mut client, more).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    let mut longer = max;
    longer[3].push('x');
    let err = fetch_jwt(&mut client, longer).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(err.message().contains("257 bytes"), "{}", err.message());

    // The operator's mint through the admin API has the same bounds.
    let mut args = vec!["jwt", "mint", "--spiffe-id", "spiffe://example.org/web"];
    let audiences: Vec<String> = (0..17).map(|i| format!("a{i}")).collect();
    for a in &audiences {
        args.extend(["--audience", a.as_str()]);
    }
    let out = ca_cli(&ca.socket, &args);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("17 audience values"), "{stderr}");

    let ca_growth = du(&dir.path().join("ca")).saturating_sub(ca_before);
    let rss_growth = rss_kib(agent.proc.id()).saturating_sub(rss_before);
    assert!(ca_growth < 1 << 20, "the CA's data grew {ca_growth} bytes");
    assert!(rss_growth < 50 << 10, "the agent grew {rss_growth} KiB");

    // Mints (cache misses) are rate-limited per caller: 300 distinct audiences at once.
    let started = Instant::now();
    let calls = (0..300).map(|i| {
        let mut c = client.clone();
        async move { fetch_jwt(&mut c, vec![format!("aud-{i}")]).await }
    });
    let results = futures::future::join_all(calls).await;
    let elapsed = started.elapsed().as_secs_f64();
    let minted = results.iter().filter(|r| r.is_ok()).count();
    let limited = results
        .iter()
        .filter(|r| matches!(r, Err(s) if s.code() == tonic::Code::ResourceExhausted))
        .count();
    assert_eq!(minted + limited, 300, "{results:?}");
    let allowed = 100.0 + 20.0 * elapsed + 1.0;
    assert!(
        (minted as f64) <= allowed && limited > 0,
        "{minted} minted, {limited} refused in {elapsed:.2} s (at most {allowed:.0} allowed)"
    );
    assert!(agent
        .proc
        .log_text()
        .contains("JWT-SVID mint rate exceeded"));
}

/// Runs a workspace binary to completion with `args`: its exit code and stderr.
fn run_bin(bin: &str, args: &[&str]) -> (Option<i32>, String) {
    let out = std::process::Command::new(meshid_tests::bin_dir().join(bin))
        .args(args)
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn write_with_mode(path: &Path, text: &str, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::write(path, text).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

/// Item 12: a `ca.toml` holding a datastore password, or a join token file, that other users
/// can read was accepted silently. Now each is refused before anything starts (exit 64), with
/// the fix in the message and without the secret.
#[test]
fn secrets_in_files_others_can_read_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("ca.toml");
    let text = "trust_domain = \"example.org\"\n\
                datastore = \"postgres://meshid:s3cr3t-pw@127.0.0.1:1/meshid\"\n";
    let path = config.to_str().unwrap();
    write_with_mode(&config, text, 0o644);
    let (code, stderr) = run_bin("meshid-ca", &["run", "--check", "--config", path]);
    assert_eq!(code, Some(64), "{stderr}");
    assert!(stderr.contains("chmod 600"), "{stderr}");
    assert!(!stderr.contains("s3cr3t"), "{stderr}");
    write_with_mode(&config, text, 0o600);
    let (code, stderr) = run_bin("meshid-ca", &["run", "--check", "--config", path]);
    assert_eq!(code, Some(0), "{stderr}");
    // Without a password in it, a readable config is fine.
    write_with_mode(
        &config,
        "trust_domain = \"example.org\"\ndatastore = \"sqlite\"\n",
        0o644,
    );
    let (code, stderr) = run_bin("meshid-ca", &["run", "--check", "--config", path]);
    assert_eq!(code, Some(0), "{stderr}");

    let token = dir.path().join("join-token");
    write_with_mode(&token, "not-a-real-token\n", 0o644);
    let agent_config = dir.path().join("agent.toml");
    write_with_mode(
        &agent_config,
        &format!(
            "trust_domain = \"example.org\"\nserver_address = \"127.0.0.1:1\"\n\
             trust_bundle_path = \"{}\"\ndata_dir = \"{}\"\nsocket_path = \"{}\"\n\
             join_token_file = \"{}\"\n",
            dir.path().join("bundle.pem").display(),
            dir.path().join("agent-data").display(),
            dir.path().join("api.sock").display(),
            token.display()
        ),
        0o644,
    );
    let args = ["run", "--check", "--config", agent_config.to_str().unwrap()];
    let (code, stderr) = run_bin("meshid-agent", &args);
    assert_eq!(code, Some(64), "{stderr}");
    assert!(stderr.contains("join token file"), "{stderr}");
    assert!(!stderr.contains("not-a-real-token"), "{stderr}");
    write_with_mode(&token, "not-a-real-token\n", 0o600);
    let (code, stderr) = run_bin("meshid-agent", &args);
    assert_eq!(code, Some(0), "{stderr}");
}
