//! Attacks from the security review (issue 10), replayed against the real `meshid-ca` and
//! `meshid-agent`: each test performs the attack as the review did and checks that it no
//! longer works.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::Path;
use std::time::{Duration, Instant};

use meshid_api::workload::spiffe_workload_api_client::SpiffeWorkloadApiClient;
use meshid_api::workload::JwtsvidRequest;
use meshid_tests::{ca_cli, rss_kib, Agent, Ca};
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

/// The arguments of `meshid-agent run` against `ca` with its data under `dir`, as
/// [`Agent::start`] passes them, without the token.
fn agent_args(dir: &Path, ca: &Ca) -> Vec<String> {
    std::fs::write(dir.join("bundle.pem"), ca.ok(&["bundle", "show"])).unwrap();
    let ops = format!("127.0.0.1:{}", meshid_tests::free_port());
    meshid_tests::agent_run_args(
        ca,
        &dir.join("bundle.pem"),
        &dir.join("agent-data"),
        &dir.join("api.sock"),
        &ops,
    )
}

fn ops_of(args: &[String]) -> String {
    let i = args.iter().position(|a| a == "--ops-address").unwrap();
    args[i + 1].clone()
}

/// Item 10: the agent dropped its join token before the first attempt, so when the CA was not
/// up yet it never attested and never exited; meanwhile the token was readable by every local
/// user in /proc/PID/cmdline. Now the token is kept until an attempt succeeds, moved off the
/// command line at start, and an agent that cannot attest exits non-zero.
#[test]
fn join_token_outlives_a_ca_not_up_yet_and_leaves_the_command_line() {
    let dir = tempfile::tempdir().unwrap();
    let mut ca = Ca::start(dir.path(), &[]);
    let (token, _agent_id) = ca.join_token();
    let mut args = agent_args(dir.path(), &ca);
    let ops = ops_of(&args);
    ca.proc.stop();

    args.extend(["--join-token".to_owned(), token.clone()]);
    let agent = meshid_tests::Proc::start(
        "meshid-agent",
        "meshid-agent",
        &args,
        dir.path().join("agent.log"),
    );
    std::thread::sleep(Duration::from_millis(1500));
    let cmdline = std::fs::read(format!("/proc/{}/cmdline", agent.id())).unwrap();
    let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
    assert!(
        !cmdline.contains(&token),
        "the token is in the command line: {cmdline}"
    );
    assert!(cmdline.contains("--join-token -"), "{cmdline}");

    // The CA comes up: the agent attests with the token it kept.
    ca.restart();
    meshid_tests::wait_for(Duration::from_secs(30), "the agent to attest", || {
        (meshid_tests::http_get(&ops, "/readyz")?.0 == 200).then_some(())
    });
    assert!(!agent.log_text().contains(&token));
}

#[test]
fn an_agent_that_cannot_attest_exits_non_zero() {
    let dir = tempfile::tempdir().unwrap();
    let mut ca = Ca::start(dir.path(), &[]);
    // A token the CA never issued: refused at once, and the agent exits.
    let mut args = agent_args(dir.path(), &ca);
    args.extend(["--join-token".to_owned(), "bm90LWEtdG9rZW4".to_owned()]);
    let mut agent = meshid_tests::Proc::start(
        "meshid-agent",
        "meshid-agent",
        &args,
        dir.path().join("refused.log"),
    );
    let status = agent.wait_exit(Duration::from_secs(20));
    assert!(
        status.is_some_and(|s| !s.success()),
        "{status:?}\n{}",
        agent.log_text()
    );
    assert!(agent.log_text().contains("refuses the join token"));

    // The CA is away for longer than attest_timeout: the agent gives up and exits.
    let (token, _) = ca.join_token();
    ca.proc.stop();
    let config = dir.path().join("agent.toml");
    std::fs::write(&config, "attest_timeout = \"2s\"\n").unwrap();
    let mut args = agent_args_with_fresh_data(dir.path(), &args);
    args.extend([
        "--config".to_owned(),
        config.display().to_string(),
        "--join-token".to_owned(),
        token,
    ]);
    let mut agent = meshid_tests::Proc::start(
        "meshid-agent",
        "meshid-agent",
        &args,
        dir.path().join("timeout.log"),
    );
    let status = agent.wait_exit(Duration::from_secs(30));
    assert!(
        status.is_some_and(|s| !s.success()),
        "{status:?}\n{}",
        agent.log_text()
    );
    assert!(agent.log_text().contains("giving up"));
}

/// `args` (from [`agent_args`], with a token at the end) for a second agent: a new data
/// directory, socket and ops port, no token.
fn agent_args_with_fresh_data(dir: &Path, args: &[String]) -> Vec<String> {
    let mut out: Vec<String> = args[..args.len() - 2].to_vec();
    let replace = |out: &mut Vec<String>, flag: &str, value: String| {
        let i = out.iter().position(|a| a == flag).unwrap();
        out[i + 1] = value;
    };
    replace(
        &mut out,
        "--data-dir",
        dir.join("agent-data-2").display().to_string(),
    );
    replace(
        &mut out,
        "--socket-path",
        dir.join("api-2.sock").display().to_string(),
    );
    let ops = format!("127.0.0.1:{}", meshid_tests::free_port());
    replace(&mut out, "--ops-address", ops);
    out
}

/// Item 2: an entry selected `unix:path:/srv/payroll` only, a binary of mode 0700 owned by
/// another user. An unprivileged user ran `unshare -Urm`, bind-mounted their own binary over
/// that path in the new namespace, ran it there and got the payroll SVID: `/proc/PID/exe`
/// shows the path as the caller's namespace sees it. Now a process whose path leads the agent
/// to another file than the one running gets no `unix:path`.
#[test]
fn unix_path_cannot_be_spoofed_from_a_mount_namespace() {
    use std::os::unix::fs::PermissionsExt;
    if meshid_tests::uid() != 0 {
        assert!(
            std::env::var_os("MESHID_CI").is_none(),
            "this test needs root"
        );
        eprintln!("SKIPPED: needs root (a second user and its namespaces)");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let ca = Ca::start(dir.path(), &[]);
    let (token, agent_id) = ca.join_token();
    let agent = Agent::start(dir.path(), &ca, &token);

    // The payroll program (here a copy of the agent's CLI, a Workload API client), root's and
    // mode 0700; and the attacker's own program, another copy.
    let bin = meshid_tests::bin_dir().join("meshid-agent");
    let srv = dir.path().join("srv");
    std::fs::create_dir(&srv).unwrap();
    std::fs::set_permissions(&srv, std::fs::Permissions::from_mode(0o755)).unwrap();
    let payroll = srv.join("payroll");
    std::fs::copy(&bin, &payroll).unwrap();
    std::fs::set_permissions(&payroll, std::fs::Permissions::from_mode(0o700)).unwrap();
    let evil = dir.path().join("evil");
    std::fs::copy(&bin, &evil).unwrap();
    std::fs::set_permissions(&evil, std::fs::Permissions::from_mode(0o755)).unwrap();
    let selector = format!("unix:path:{}", payroll.display());
    ca.ok(&[
        "entry",
        "create",
        "--id",
        "payroll",
        "--spiffe-id",
        "spiffe://example.org/payroll",
        "--parent-id",
        &agent_id,
        "--selector",
        &selector,
    ]);
    let socket = agent.socket.display().to_string();

    // The real payroll program, run by its owner, gets its SVID (once the agent has the entry).
    meshid_tests::wait_for(Duration::from_secs(30), "the payroll SVID", || {
        let out = std::process::Command::new(&payroll)
            .args(["api", "fetch", "x509", "-s", &socket])
            .output()
            .unwrap();
        out.status.success().then_some(())
    });

    // The attack, as nobody.
    let script = format!(
        "mount --bind {evil} {payroll} && exec {payroll} api fetch x509 -s {socket}",
        evil = evil.display(),
        payroll = payroll.display(),
    );
    let out = std::process::Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
        .args(["unshare", "-Urm", "sh", "-c", &script])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && !stdout.contains("spiffe://example.org/payroll"),
        "the spoofed binary got the payroll SVID:\n{stdout}\n{stderr}"
    );
    assert!(stderr.contains("no identity issued"), "{stderr}");
}

/// Items 8 and 13: `entry create` and `x509 mint` accepted `spiffe://<td>/meshid/agent/...` and
/// `spiffe://<td>/meshid/server`, the identities the node API and the agent recognize agents and
/// the CA by; and the entry `admin` flag was stored though nothing enforces it. Now the
/// reserved path is refused wherever the CA issues to workloads, and so is the flag.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reserved_ids_and_the_unenforced_admin_flag_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::start(dir.path(), &[]);
    let (_, agent_id) = ca.join_token();
    let out_dir = dir.path().join("svid");
    let out_dir = out_dir.to_str().unwrap();
    let reserved = [
        "spiffe://example.org/meshid/server",
        "spiffe://example.org/meshid/agent/join_token/abc",
        "spiffe://example.org/meshid",
    ];
    for id in reserved {
        for args in [
            vec![
                "entry",
                "create",
                "--spiffe-id",
                id,
                "--parent-id",
                &agent_id,
                "--selector",
                "unix:uid:0",
            ],
            vec![
                "x509",
                "mint",
                "--spiffe-id",
                id,
                "--ttl",
                "10m",
                "--out-dir",
                out_dir,
            ],
            vec!["jwt", "mint", "--spiffe-id", id, "--audience", "a"],
        ] {
            let out = ca_cli(&ca.socket, &args);
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert!(!out.status.success(), "{args:?} succeeded");
            assert!(stderr.contains("reserved"), "{args:?}: {stderr}");
        }
    }
    // A path that merely begins with the same letters is a workload's like any other.
    ca.ok(&[
        "entry",
        "create",
        "--spiffe-id",
        "spiffe://example.org/meshidx/web",
        "--parent-id",
        &agent_id,
        "--selector",
        "unix:uid:0",
    ]);
    assert!(!out_dir.is_empty() && !Path::new(out_dir).join("svid.pem").exists());

    let channel = meshid_api::client::connect_unix(&ca.socket).await.unwrap();
    let mut entries = meshid_api::admin::entries_client::EntriesClient::new(channel);
    let err = entries
        .create_entry(meshid_api::admin::CreateEntryRequest {
            entry: Some(meshid_api::admin::Entry {
                spiffe_id: "spiffe://example.org/ops".into(),
                parent_id: agent_id.clone(),
                selectors: vec!["unix:uid:0".into()],
                admin: true,
                ..Default::default()
            }),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");
    assert!(
        err.message().contains("admin flag is not enforced"),
        "{}",
        err.message()
    );
    let out = ca_cli(&ca.socket, &["entry", "create", "--admin", "true"]);
    assert!(!out.status.success(), "the CLI still offers --admin");
}

/// Item 11: `touch` on one's own 200 MB binary made the agent hash it again on every call
/// (2.3 s of agent CPU for 10 calls). Now each uid has a hashing budget (4 at once, 1 a
/// second); past it, its callers get no `unix:sha256` until it refills.
#[test]
fn touching_ones_binary_does_not_make_the_agent_hash_it_on_every_call() {
    use std::io::Write as _;
    use std::os::unix::fs::PermissionsExt;
    if meshid_tests::uid() != 0 {
        assert!(
            std::env::var_os("MESHID_CI").is_none(),
            "this test needs root"
        );
        eprintln!("SKIPPED: needs root (a second user)");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let ca = Ca::start(dir.path(), &[]);
    let (token, _) = ca.join_token();
    let agent = Agent::start(dir.path(), &ca, &token);

    // nobody's own large program: a Workload API client (the agent's CLI, stripped of its
    // debug information, which would put a debug build over the size cap) padded to 64 MiB.
    let big = dir.path().join("big-client");
    std::fs::copy(meshid_tests::bin_dir().join("meshid-agent"), &big).unwrap();
    let stripped = std::process::Command::new("strip").arg(&big).status();
    assert!(
        stripped.is_ok_and(|s| s.success()),
        "strip (binutils) is needed"
    );
    let mut f = std::fs::OpenOptions::new().append(true).open(&big).unwrap();
    let pad = 64 * 1024 * 1024 - f.metadata().unwrap().len().min(64 * 1024 * 1024);
    f.write_all(&vec![0u8; pad as usize]).unwrap();
    drop(f);
    std::os::unix::fs::chown(&big, Some(65534), Some(65534)).unwrap();
    std::fs::set_permissions(&big, std::fs::Permissions::from_mode(0o755)).unwrap();

    let calls = 12;
    let script = format!(
        "for i in $(seq {calls}); do touch {big}; {big} api fetch x509 -s {socket}; done; true",
        big = big.display(),
        socket = agent.socket.display(),
    );
    let started = Instant::now();
    let out = std::process::Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
        .args(["sh", "-c", &script])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        stderr.matches("no identity issued").count(),
        calls,
        "every call attested and refused:\n{stderr}"
    );
    let elapsed = started.elapsed().as_secs_f64();
    let log = agent.proc.log_text();
    let hashed = log
        .lines()
        .filter(|l| l.contains("hashing workload binary") && l.contains("uid=65534"))
        .count();
    let allowed = 4.0 + elapsed + 1.0;
    assert!(
        log.contains("hash budget exceeded"),
        "no call was refused a hash ({hashed} hashes for {calls} calls in {elapsed:.1} s):\n{}",
        log.lines()
            .filter(|l| l.contains("65534"))
            .take(6)
            .collect::<Vec<_>>()
            .join("\n")
    );
    assert!(
        (hashed as f64) <= allowed,
        "{hashed} hashes for {calls} calls in {elapsed:.1} s (at most {allowed:.0})"
    );
}

// =============================================================================================
// Item 3: unauthenticated denial of service of the node API

/// Accepts any server certificate: the flood does not care whom it talks to.
#[derive(Debug)]
struct AnyServer(std::sync::Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for AnyServer {
    fn verify_server_cert(
        &self,
        _: &rustls_pki_types::CertificateDer<'_>,
        _: &[rustls_pki_types::CertificateDer<'_>],
        _: &rustls_pki_types::ServerName<'_>,
        _: &[u8],
        _: rustls_pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls_pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls_pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// A TCP connection to `node` from `source` that sends nothing and is opened again as soon
/// as the CA closes it, until `stop`; counts its connects.
async fn silent_connection(
    node: std::net::SocketAddr,
    source: std::net::IpAddr,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    connects: std::sync::Arc<std::sync::atomic::AtomicU64>,
) {
    use std::sync::atomic::Ordering;
    use tokio::io::AsyncReadExt;
    while !stop.load(Ordering::Relaxed) {
        let Ok(socket) = tokio::net::TcpSocket::new_v4() else {
            return;
        };
        if socket.bind((source, 0).into()).is_err() {
            return;
        }
        let Ok(Ok(mut tcp)) =
            tokio::time::timeout(Duration::from_secs(2), socket.connect(node)).await
        else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        connects.fetch_add(1, Ordering::Relaxed);
        let mut buf = [0u8; 64];
        // Until the CA closes it (or the flood ends).
        loop {
            tokio::select! {
                r = tcp.read(&mut buf) => if !matches!(r, Ok(n) if n > 0) { break },
                () = tokio::time::sleep(Duration::from_millis(200)) => {
                    if stop.load(Ordering::Relaxed) { return; }
                }
            }
        }
    }
}

/// A TLS connection without a client certificate that speaks HTTP/2 and answers the CA's
/// pings but makes no call; how long it lived (capped at `limit`).
async fn certless_connection(node: std::net::SocketAddr, limit: Duration) -> Option<Duration> {
    let provider = std::sync::Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .ok()?
        .dangerous()
        .with_custom_certificate_verifier(std::sync::Arc::new(AnyServer(provider)))
        .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec()];
    let tcp = tokio::net::TcpStream::connect(node).await.ok()?;
    let tls = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config))
        .connect(
            rustls_pki_types::ServerName::try_from("meshid-ca").ok()?,
            tcp,
        )
        .await
        .ok()?;
    let started = Instant::now();
    let (_send, conn) =
        hyper::client::conn::http2::handshake::<_, _, http_body_util::Empty<bytes::Bytes>>(
            hyper_util::rt::TokioExecutor::new(),
            hyper_util::rt::TokioIo::new(tls),
        )
        .await
        .ok()?;
    // The connection task answers pings until the CA closes the connection.
    let _ = tokio::time::timeout(limit, conn).await;
    Some(started.elapsed())
}

#[test]
fn node_api_serves_agents_through_a_connection_flood() {
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    use std::sync::Arc;
    let _alone = crate::load_test();
    let dir = tempfile::tempdir().unwrap();
    // Shedding must be reached however busy the machine is (the other tests of this binary run
    // beside this one): three quarters of the default handshake cap, against 1,440 silent
    // connections.
    let config = dir.path().join("ca.toml");
    std::fs::write(&config, "[node_limits]\nmax_pending_handshakes = 768\n").unwrap();
    let ca = Ca::start(dir.path(), &["--config", config.to_str().unwrap()]);
    let node: std::net::SocketAddr = ca.node_address.parse().unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let connects = Arc::new(AtomicU64::new(0));
    // The review's flood, grown: 1,440 silent connections from 24 loopback addresses (60
    // each, within a source's budget, so together they exhaust the global one) and 100 from
    // one more address (past its budget), each opened again as soon as the CA closes it.
    // The one past its budget starts first, alone: its 65th handshake is refused for its source
    // before the global slots are full (once they are, the oldest pending are shed faster than
    // one source can hold 64, and which limit a connection meets is a race).
    let mut flood = Vec::new();
    for _ in 0..100 {
        flood.push(rt.spawn(silent_connection(
            node,
            std::net::IpAddr::from([127, 0, 0, 30]),
            stop.clone(),
            connects.clone(),
        )));
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while connects.load(Ordering::Relaxed) < 100 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    for (source, count) in (2..26u8).map(|n| (n, 60)) {
        for _ in 0..count {
            flood.push(rt.spawn(silent_connection(
                node,
                std::net::IpAddr::from([127, 0, 0, source]),
                stop.clone(),
                connects.clone(),
            )));
        }
    }
    // And 100 TLS connections without a certificate that answer pings.
    let certless: Vec<_> = (0..100)
        .map(|_| rt.spawn(certless_connection(node, Duration::from_secs(40))))
        .collect();
    std::thread::sleep(Duration::from_secs(3));
    let before = connects.load(Ordering::Relaxed);
    assert!(
        before >= 1_000,
        "the flood did not start: {before} connects"
    );

    // Through it, a new agent attests, becomes ready and serves a workload.
    let (token, agent_id) = ca.join_token();
    let started = Instant::now();
    let agent = Agent::start(dir.path(), &ca, &token);
    ca.entry_for_this_uid("flooded", "spiffe://example.org/flooded", &agent_id, &[]);
    let svid = rt.block_on(async {
        let client = spiffe::WorkloadApiClient::connect_to(agent.endpoint())
            .await
            .unwrap();
        tokio::time::timeout(Duration::from_secs(20), async {
            loop {
                if let Ok(svid) = client.fetch_x509_svid().await {
                    return svid;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
        .await
    });
    let svid = svid.expect("the agent served no SVID during the flood");
    assert_eq!(svid.spiffe_id().to_string(), "spiffe://example.org/flooded");
    eprintln!(
        "agent ready and serving {:?} after the flood started, {} flood connects so far",
        started.elapsed() + Duration::from_secs(3),
        connects.load(Ordering::Relaxed)
    );

    // The certificate-less connections were closed after their short lifetime, pings or not.
    let lived: Vec<Option<Duration>> = rt.block_on(async {
        let mut out = Vec::new();
        for c in certless {
            out.push(c.await.unwrap());
        }
        out
    });
    let established = lived.iter().flatten().count();
    assert!(
        established >= 50,
        "only {established} certless connections were made"
    );
    for l in lived.iter().flatten() {
        assert!(
            *l < Duration::from_secs(20),
            "a certless connection lived {l:?}"
        );
    }
    stop.store(true, Ordering::Relaxed);
    let metrics = meshid_tests::http_get(&ca.ops_address, "/metrics")
        .unwrap()
        .1;
    for reason in ["shed", "source_pending", "certless_lifetime"] {
        let line = format!("meshid_ca_node_connections_limited_total{{reason=\"{reason}\"}}");
        let value: f64 = metrics
            .lines()
            .find_map(|l| l.strip_prefix(&line))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0.0);
        assert!(
            value > 0.0,
            "no {reason} in\n{}",
            metrics
                .lines()
                .filter(|l| l.contains("node_"))
                .collect::<Vec<_>>()
                .join("\n")
        );
    }
    rt.block_on(async {
        for f in flood {
            let _ = tokio::time::timeout(Duration::from_secs(2), f).await;
        }
    });

    // With the flood over, a silent connection is closed once the ClientHello deadline passes
    // (not after the whole handshake time).
    let closed_after: Vec<Duration> = rt.block_on(async {
        let mut waits = Vec::new();
        for _ in 0..5 {
            waits.push(tokio::spawn(async move {
                use tokio::io::AsyncReadExt;
                let mut tcp = tokio::net::TcpStream::connect(node).await.unwrap();
                let started = Instant::now();
                let _ =
                    tokio::time::timeout(Duration::from_secs(15), tcp.read(&mut [0u8; 8])).await;
                started.elapsed()
            }));
        }
        let mut out = Vec::new();
        for w in waits {
            out.push(w.await.unwrap());
        }
        out
    });
    for d in &closed_after {
        assert!(
            (Duration::from_secs(2)..Duration::from_secs(5)).contains(d),
            "a silent connection was closed after {d:?}"
        );
    }
    rt.shutdown_timeout(Duration::from_secs(2));
}

// =============================================================================================
// Items 5 and 6: the Workload API's connections

const EXEC_SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/interop/exec_after_connect.py");

/// Item 5: a process that is not entitled to an identity connected to the Workload API, then
/// exec'd the program an entry pins, keeping the connection, and the agent (which attested
/// `/proc/<pid>` only when the call came) gave it that program's SVID. Now the identity of a
/// connection is its process as it was when the connection was accepted.
#[test]
fn exec_after_connect_does_not_borrow_the_identity_of_the_new_program() {
    let Some(python) = meshid_tests::interop_python("h2") else {
        return;
    };
    // The pinned program: the interpreter the venv's python runs.
    let pinned = std::fs::canonicalize(&python).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::start(dir.path(), &[]);
    let (token, agent_id) = ca.join_token();
    let agent = Agent::start(dir.path(), &ca, &token);
    let selector = format!("unix:path:{}", pinned.display());
    ca.entry_for_this_uid(
        "pinned",
        "spiffe://example.org/pinned",
        &agent_id,
        &["--selector", &selector],
    );
    let socket = agent.socket.display().to_string();
    let run = |cmd: &mut std::process::Command| {
        let out = cmd.output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned()
            + &String::from_utf8_lossy(&out.stderr);
        text
    };
    // The pinned program itself gets the SVID (once the entry has reached the agent).
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let out =
            run(std::process::Command::new(&python).args([EXEC_SCRIPT, "call-socket", &socket]));
        if out.contains("status 0") && out.contains("svid ") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the pinned program got no SVID: {out}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    // Another program (perl) connects, then (once the agent has accepted the connection)
    // execs the pinned one, which calls on the inherited connection. (A process that execs
    // between its connect and the agent's accept is seen as the new program: that window
    // remains, see the README.)
    let out = run(std::process::Command::new("perl")
        .args([
            "-e",
            "use Socket; $^F = 100000; socket(my $s, PF_UNIX, SOCK_STREAM, 0) or die $!; \
             connect($s, pack_sockaddr_un($ARGV[0])) or die $!; select(undef, undef, undef, 0.5); \
             exec($ARGV[1], $ARGV[2], 'call', fileno($s)) or die $!;",
            &socket,
        ])
        .arg(&python)
        .arg(EXEC_SCRIPT));
    assert!(out.contains("status 7"), "exec after connect: {out}");
    assert!(
        !out.contains("svid "),
        "exec after connect got an SVID: {out}"
    );
    assert!(
        agent
            .proc
            .log_text()
            .contains("the process that connected has since exec'd another program"),
        "{}",
        agent.proc.log_text()
    );
}

/// Opens `count` connections to `socket` as nobody and watches them for `watch` seconds:
/// `connected N`, then `closed <seconds after connect>` per connection the agent closed.
const HOLD_CONNECTIONS: &str = r#"
import select, socket, sys, time
path, count, watch = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
socks = []
for _ in range(count):
    s = socket.socket(socket.AF_UNIX)
    try:
        s.connect(path)
    except OSError as e:
        print("connect failed", e, flush=True)
        break
    socks.append((s, time.monotonic()))
print("connected", len(socks), flush=True)
poller = select.poll()
by_fd = {}
for s, t in socks:
    poller.register(s, select.POLLIN | select.POLLHUP)
    by_fd[s.fileno()] = (s, t)
end = time.monotonic() + watch
while by_fd and time.monotonic() < end:
    for fd, _ in poller.poll(100):
        s, t = by_fd[fd]
        try:
            data = s.recv(4096)
        except OSError:
            data = b""
        if not data:
            # Closed by the agent (what it sent before, its HTTP/2 settings, is ignored).
            del by_fd[fd]
            poller.unregister(fd)
            print("closed", round(time.monotonic() - t, 2), flush=True)
"#;

fn hold_as_nobody(socket: &Path, count: usize, watch: f64) -> std::process::Child {
    std::process::Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
        .args(["/usr/bin/python3", "-c", HOLD_CONNECTIONS])
        .arg(socket)
        .args([count.to_string(), watch.to_string()])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap()
}

/// CPU time (user + system) of process `pid`, in clock ticks.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let rest = &stat[stat.rfind(')').unwrap() + 1..];
    let f: Vec<&str> = rest.split_ascii_whitespace().collect();
    f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()
}

/// A workload's FetchX509SVID through `agent`, within `timeout`.
fn fetch_works(agent: &Agent, timeout: Duration) -> bool {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        tokio::time::timeout(timeout, async {
            let client = spiffe::WorkloadApiClient::connect_to(agent.endpoint())
                .await
                .ok()?;
            client.fetch_x509_svid().await.ok()
        })
        .await
        .ok()
        .flatten()
        .is_some()
    })
}

/// Item 6: one user opened connections until the agent ran out of file descriptors; its
/// accept loop then spun at 100 % CPU writing millions of log lines and every workload's
/// call timed out. Now connections are capped per uid and in all, a connection that sends no
/// request is closed after a few seconds, and a failing accept backs off and logs once a
/// second.
#[test]
fn workload_api_connections_are_capped_and_accept_failures_back_off() {
    let _alone = crate::load_test();
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::start(dir.path(), &[]);
    let (token, agent_id) = ca.join_token();
    let agent = Agent::start(dir.path(), &ca, &token);
    ca.entry_for_this_uid("me", "spiffe://example.org/me", &agent_id, &[]);
    assert!(fetch_works(&agent, Duration::from_secs(15)));

    // 1,500 connections as nobody: 1,024 (the per-uid cap) are held, the rest closed at once,
    // and the held ones closed when they have sent no request for 5 s. Meanwhile this uid's
    // workload is served.
    let holder = hold_as_nobody(&agent.socket, 1500, 9.0);
    std::thread::sleep(Duration::from_secs(2));
    assert!(
        fetch_works(&agent, Duration::from_secs(5)),
        "a workload was not served"
    );
    let out = holder.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("connected 1500"), "{text}");
    let closed: Vec<f64> = text
        .lines()
        .filter_map(|l| l.strip_prefix("closed "))
        .map(|v| v.parse().unwrap())
        .collect();
    let at_once = closed.iter().filter(|&&t| t < 1.0).count();
    let idle = closed.iter().filter(|&&t| (4.0..8.0).contains(&t)).count();
    let summary = format!(
        "{} closed: {at_once} within 1 s, {idle} after 4 to 8 s, times {:?}",
        closed.len(),
        closed.iter().step_by(50).collect::<Vec<_>>()
    );
    assert_eq!(at_once, 1500 - 1024, "{summary}");
    let metrics = meshid_tests::http_get(&agent.ops_address, "/metrics")
        .unwrap()
        .1;
    let metric = |name: &str| -> f64 {
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(-1.0)
    };
    assert_eq!(
        metric("meshid_agent_workload_api_connections_refused_total"),
        476.0,
        "{metrics}"
    );
    let log = agent.proc.log_text();
    assert_eq!(
        idle,
        1024,
        "{summary}; agent log: {} idle closes, tail:\n{}",
        log.matches("sent no request in time").count(),
        log.lines().rev().take(5).collect::<Vec<_>>().join("\n")
    );
    let metrics = meshid_tests::http_get(&agent.ops_address, "/metrics")
        .unwrap()
        .1;
    assert!(
        metrics.contains("meshid_agent_workload_api_connections_idle_closed_total 1024"),
        "{metrics}"
    );
    drop(agent);

    // Out of file descriptors (an agent with a low limit and no per-uid cap): the accept
    // loop backs off, logs at most once a second, and serves again once descriptors free up.
    let data = tempfile::tempdir().unwrap();
    let bundle = data.path().join("bundle.pem");
    std::fs::write(&bundle, ca.ok(&["bundle", "show"])).unwrap();
    let config = data.path().join("agent.toml");
    std::fs::write(&config, "max_connections_per_uid = 100000\n").unwrap();
    let (token, agent_id) = ca.join_token();
    ca.entry_for_this_uid("me-2", "spiffe://example.org/me", &agent_id, &[]);
    let socket = data.path().join("api.sock");
    let ops = format!("127.0.0.1:{}", meshid_tests::free_port());
    let mut args =
        meshid_tests::agent_run_args(&ca, &bundle, &data.path().join("d"), &socket, &ops);
    args.extend(["--config".into(), config.display().to_string()]);
    args.extend(["--join-token".into(), token]);
    let mut cmd = std::process::Command::new("prlimit");
    cmd.args(["--nofile=256:256", "--"])
        .arg(meshid_tests::bin_dir().join("meshid-agent"))
        .args(&args);
    let mut starved = meshid_tests::Proc::spawn("meshid-agent", cmd, data.path().join("agent.log"));
    meshid_tests::wait_for(Duration::from_secs(30), "the agent", || {
        starved.check_alive();
        (meshid_tests::http_get(&ops, "/readyz")?.0 == 200).then_some(())
    });
    let pid = starved.id();
    let holder = hold_as_nobody(&socket, 600, 8.0);
    std::thread::sleep(Duration::from_secs(1));
    let (cpu_before, t0) = (cpu_ticks(pid), Instant::now());
    std::thread::sleep(Duration::from_secs(3));
    let ticks_per_second = 100.0;
    let cpu = (cpu_ticks(pid) - cpu_before) as f64 / ticks_per_second / t0.elapsed().as_secs_f64();
    let out = holder.wait_with_output().unwrap();
    let log = starved.log_text();
    let accept_lines = log.lines().filter(|l| l.contains("accept failed")).count();
    assert!(log.to_lowercase().contains("too many open files"), "{log}");
    assert!(
        cpu < 0.3,
        "the agent used {:.0} % CPU while out of descriptors",
        cpu * 100.0
    );
    assert!(
        accept_lines <= 12,
        "{accept_lines} accept-failure lines:\n{log}"
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.lines().any(|l| l.starts_with("closed ")), "{text}");
    // Descriptors are back: served again.
    let served = Agent {
        proc: starved,
        socket,
        ops_address: ops,
        data_dir: data.path().join("d"),
    };
    assert!(
        fetch_works(&served, Duration::from_secs(10)),
        "not served after the flood"
    );
}

// =============================================================================================
// Item 9: agent SVIDs bound to the agent record

fn agent_csr() -> (Vec<u8>, rustls_pki_types::PrivateKeyDer<'static>) {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let csr = rcgen::CertificateParams::new(Vec::<String>::new())
        .unwrap()
        .serialize_request(&key)
        .unwrap();
    (
        csr.der().to_vec(),
        rustls_pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
    )
}

/// A node API client of the real CA, as an agent holding `svid` and `key`, or anonymous.
async fn node_client(
    ca: &Ca,
    identity: Option<(
        &meshid_api::node::AgentSvid,
        &rustls_pki_types::PrivateKeyDer<'static>,
    )>,
) -> meshid_api::node::node_client::NodeClient<Channel> {
    use rustls_pki_types::pem::PemObject;
    let pem = ca.ok(&["bundle", "show"]);
    let roots: Vec<rustls_pki_types::CertificateDer<'static>> =
        rustls_pki_types::CertificateDer::pem_slice_iter(pem.as_bytes())
            .map(Result::unwrap)
            .collect();
    let identity = identity.map(|(svid, key)| {
        (
            svid.chain.iter().map(|c| c.clone().into()).collect(),
            key.clone_key(),
        )
    });
    let config = meshid_api::tls::client_config(
        roots,
        meshid_api::tls::ExpectedId::Exact(
            spiffe::SpiffeId::new("spiffe://example.org/meshid/server").unwrap(),
        ),
        identity,
    )
    .unwrap();
    let channel = meshid_api::tls::connect(&ca.node_address, std::sync::Arc::new(config))
        .await
        .unwrap();
    meshid_api::node::node_client::NodeClient::new(channel)
}

/// Item 9: after a legitimate renewal, the superseded (possibly stolen) agent SVID still
/// passed Sync, BatchSignX509 and RenewAgent, and could be renewed forever alongside the real
/// agent. Now only the current SVID is honoured (the superseded one for a short overlap, 1 s
/// here), a superseded one used later is refused, counted, logged and audited, and streams
/// opened with it end.
#[test]
fn a_superseded_agent_svid_is_refused_after_its_successor() {
    use meshid_api::node;
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("ca.toml");
    std::fs::write(&config, "agent_svid_overlap = \"1s\"\n").unwrap();
    let ca = Ca::start(dir.path(), &["--config", config.to_str().unwrap()]);
    let (token, agent_id) = ca.join_token();
    ca.entry_for_this_uid("w", "spiffe://example.org/w", &agent_id, &[]);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let (csr, old_key) = agent_csr();
        let old = node_client(&ca, None)
            .await
            .attest_join_token(node::AttestJoinTokenRequest { token, csr })
            .await
            .unwrap()
            .into_inner();
        // The stolen copy: the old SVID and key, with a sync stream open.
        let mut thief = node_client(&ca, Some((&old, &old_key))).await;
        let mut stream = thief.sync(node::SyncRequest {}).await.unwrap().into_inner();
        assert!(stream.message().await.unwrap().unwrap().full);

        // The real agent renews.
        let (csr, new_key) = agent_csr();
        let mut real = node_client(&ca, Some((&old, &old_key))).await;
        let new = real
            .renew_agent(node::RenewAgentRequest { csr })
            .await
            .unwrap()
            .into_inner();
        let mut real = node_client(&ca, Some((&new, &new_key))).await;
        tokio::time::sleep(Duration::from_millis(1500)).await;

        // The thief's stream ended after the overlap, and every call with the old SVID is
        // refused, on the open connection and on a new one.
        let ended = tokio::time::timeout(Duration::from_secs(5), async {
            loop {
                match stream.message().await {
                    Ok(Some(_)) => continue,
                    other => return other,
                }
            }
        })
        .await
        .expect("the stream of the superseded SVID did not end");
        assert!(ended.is_err() || ended.unwrap().is_none());
        let mut fresh = node_client(&ca, Some((&old, &old_key))).await;
        for client in [&mut thief, &mut fresh] {
            let refused = |s: tonic::Status| {
                assert_eq!(s.code(), tonic::Code::PermissionDenied, "{s:?}");
                assert!(s.message().contains("superseded"), "{s:?}");
            };
            refused(client.sync(node::SyncRequest {}).await.unwrap_err());
            refused(
                client
                    .batch_sign_x509(node::BatchSignX509Request {
                        requests: vec![node::SignRequest {
                            entry_id: "w".into(),
                            csr: agent_csr().0,
                        }],
                    })
                    .await
                    .unwrap_err(),
            );
            refused(
                client
                    .renew_agent(node::RenewAgentRequest { csr: agent_csr().0 })
                    .await
                    .unwrap_err(),
            );
        }
        // The real agent is served.
        let signed = real
            .batch_sign_x509(node::BatchSignX509Request {
                requests: vec![node::SignRequest {
                    entry_id: "w".into(),
                    csr: agent_csr().0,
                }],
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(signed.results.len(), 1);
        assert!(real.sync(node::SyncRequest {}).await.is_ok());
    });
    // Counted, logged, and audited once.
    let metrics = meshid_tests::http_get(&ca.ops_address, "/metrics")
        .unwrap()
        .1;
    let used: f64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("meshid_ca_node_superseded_agent_svids_total "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0);
    assert!(used >= 6.0, "{used}");
    assert!(ca
        .proc
        .log_text()
        .contains("a superseded agent SVID was used after its successor"));
    // The audit log read as stored, by an independent SQLite reader (Python's sqlite3), so
    // that this crate links no CA library.
    let db = dir.path().join("ca/meshid-ca.db");
    let out = std::process::Command::new("python3")
        .args([
            "-c",
            "import sqlite3, sys\n\
             rows = sqlite3.connect(sys.argv[1]).execute(\n\
                 \"SELECT actor FROM audit_log WHERE kind = 'agent.superseded_svid_used' ORDER BY seq\")\n\
             for (actor,) in rows: print(actor)",
        ])
        .arg(&db)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let actors = String::from_utf8(out.stdout).unwrap();
    let kinds: Vec<&str> = actors.lines().collect();
    assert_eq!(kinds, [agent_id.as_str()]);
    rt.shutdown_timeout(Duration::from_secs(2));
}

// =============================================================================================
// Item 7: a transient full disk

/// Unmounts its path (lazily) when dropped, whatever the test did.
struct Mounted(std::path::PathBuf);

impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}

fn create_entry(ca: &Ca, n: usize) -> std::process::Output {
    meshid_tests::ca_cli(
        &ca.socket,
        &[
            "entry",
            "create",
            "--id",
            &format!("e{n}"),
            "--spiffe-id",
            &format!("spiffe://example.org/disk/{n}"),
            "--parent-id",
            "spiffe://example.org/meshid/agent/join_token/x",
            "--selector",
            "unix:uid:1000",
        ],
    )
}

/// Item 7: after SQLITE_FULL on a commit, the pooled connection went back to the pool inside
/// its transaction: every later write failed (`begin_with at non-zero transaction depth`),
/// even after space returned, while `/readyz` kept answering ready. Now a write that fails
/// leaves no broken connection behind, readiness takes a write, and writes work again as soon
/// as there is space, without a restart. (PostgreSQL: `ca/tests/it/store.rs`, connections killed
/// under the store.)
#[test]
fn a_full_disk_fails_writes_and_readiness_until_space_returns() {
    if meshid_tests::uid() != 0 {
        assert!(
            std::env::var_os("MESHID_CI").is_none(),
            "needs root to mount a tmpfs"
        );
        eprintln!("SKIPPED: needs root to mount a tmpfs");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("ca");
    std::fs::create_dir(&data).unwrap();
    let status = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=4m,mode=0700", "tmpfs"])
        .arg(&data)
        .status()
        .unwrap();
    assert!(status.success());
    let _mounted = Mounted(data.clone());
    let ca = Ca::start(dir.path(), &[]);
    let ready = || meshid_tests::http_get(&ca.ops_address, "/readyz").map(|r| r.0);
    assert!(create_entry(&ca, 0).status.success());
    assert_eq!(ready(), Some(200));

    // Fill the disk, then write until a write fails.
    let filler = data.join("filler");
    {
        use std::io::Write;
        let mut f = std::fs::File::create(&filler).unwrap();
        let chunk = vec![0u8; 16 * 1024];
        while f.write_all(&chunk).is_ok() {}
        let _ = f.sync_all();
    }
    let mut failed = None;
    for n in 1..400 {
        let out = create_entry(&ca, n);
        if !out.status.success() {
            failed = Some(String::from_utf8_lossy(&out.stderr).into_owned());
            break;
        }
    }
    let failed = failed.expect("no write failed on a full disk");
    assert!(
        failed.to_lowercase().contains("full") || failed.contains("disk"),
        "{failed}"
    );
    assert_eq!(ready(), Some(503), "ready with a write path that fails");

    // Space returns: writes and readiness recover without a restart.
    std::fs::remove_file(&filler).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut n = 1000;
    loop {
        n += 1;
        let out = create_entry(&ca, n);
        if out.status.success() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "writes still fail after space returned: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    for m in n + 1..n + 5 {
        assert!(create_entry(&ca, m).status.success());
    }
    assert_eq!(ready(), Some(200));
    assert!(meshid_tests::ca_cli(&ca.socket, &["audit", "verify"])
        .status
        .success());
}

// =============================================================================================
// Item 8: a workload SVID posing as the CA to a fresh agent

/// The CA's issuing intermediate and its key, as a thief with the data directory has them:
/// the certificate from a workload SVID's chain, the key from the key file that matches it.
fn stolen_intermediate(
    ca: &Ca,
    dir: &Path,
) -> (
    rcgen::Issuer<'static, rcgen::KeyPair>,
    rustls_pki_types::CertificateDer<'static>,
) {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::CertificateDer;
    let mint = dir.join("mint");
    std::fs::create_dir_all(&mint).unwrap();
    ca.ok(&[
        "x509",
        "mint",
        "--spiffe-id",
        "spiffe://example.org/w",
        "--out-dir",
        mint.to_str().unwrap(),
    ]);
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(mint.join("chain.pem"))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    let intermediate = chain[1].clone();
    let (_, parsed) = x509_parser::parse_x509_certificate(&intermediate).unwrap();
    let spki = parsed.public_key().raw.to_vec();
    let key = std::fs::read_dir(dir.join("ca/keys"))
        .unwrap()
        .filter_map(|e| std::fs::read_to_string(e.unwrap().path()).ok())
        .filter_map(|pem| rcgen::KeyPair::from_pem(&pem).ok())
        .find(|k| rcgen::PublicKeyData::subject_public_key_info(k) == spki)
        .expect("the intermediate's key");
    let issuer = rcgen::Issuer::from_ca_cert_der(&intermediate, key).unwrap();
    (issuer, intermediate)
}

/// A leaf for `uri` signed by `issuer`, with the `role` mark when given (a thief with the
/// intermediate's key can forge it too).
fn forged_leaf(
    issuer: &rcgen::Issuer<'static, rcgen::KeyPair>,
    uri: &str,
    role: Option<meshid_api::role::Role>,
    key: &rcgen::KeyPair,
) -> rcgen::Certificate {
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    params.subject_alt_names = vec![rcgen::SanType::URI(uri.try_into().unwrap())];
    params.key_usages = vec![rcgen::KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![
        rcgen::ExtendedKeyUsagePurpose::ServerAuth,
        rcgen::ExtendedKeyUsagePurpose::ClientAuth,
    ];
    if let Some(role) = role {
        params
            .custom_extensions
            .push(rcgen::CustomExtension::from_oid_content(
                &meshid_api::role::CERTIFICATE_POLICIES,
                role.policies_extension(),
            ));
    }
    params.signed_by(key, issuer).unwrap()
}

/// A fresh agent with the real bundle and a real join token of `ca`, whose CA address is
/// `server`: the process, its data directory and the bootstrap bundle file.
fn fresh_agent_pointed_at(
    ca: &Ca,
    dir: &Path,
    server: String,
) -> (meshid_tests::Proc, std::path::PathBuf, std::path::PathBuf) {
    let bundle = dir.join("bundle.pem");
    std::fs::write(&bundle, ca.ok(&["bundle", "show"])).unwrap();
    let (token, _) = ca.join_token();
    let ops = format!("127.0.0.1:{}", meshid_tests::free_port());
    let data = dir.join("agent-data");
    let mut args = meshid_tests::agent_run_args(ca, &bundle, &data, &dir.join("api.sock"), &ops);
    let at = args.iter().position(|a| a == "--server-address").unwrap() + 1;
    args[at] = server;
    args.extend(["--join-token".into(), token]);
    let agent =
        meshid_tests::Proc::start("meshid-agent", "meshid-agent", &args, dir.join("agent.log"));
    (agent, data, bundle)
}

/// Item 8: a workload SVID carrying the CA server's ID (minted before `/meshid/` was reserved,
/// or with a stolen intermediate key) could pose as the CA to a fresh agent, which then
/// adopted the attacker's bundle. Here the CA's own intermediate key signs such an SVID,
/// without the server mark, for a server the real agent is pointed at: the agent never
/// completes a handshake with it.
#[test]
fn an_unmarked_server_svid_cannot_pose_as_the_ca() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::start(dir.path(), &[]);
    let (issuer, intermediate) = stolen_intermediate(&ca, dir.path());
    let leaf_key = rcgen::KeyPair::generate().unwrap();
    let leaf = forged_leaf(
        &issuer,
        "spiffe://example.org/meshid/server",
        None,
        &leaf_key,
    );

    // The impostor: TLS with that SVID, counting completed handshakes.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let config = rustls::ServerConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(
        vec![leaf.der().clone(), intermediate],
        rustls_pki_types::PrivateKeyDer::Pkcs8(leaf_key.serialize_der().into()),
    )
    .unwrap();
    let listener = rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    let impostor = listener.local_addr().unwrap().to_string();
    let completed = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let attempts = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let acceptor = tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(config));
    let (c, a) = (completed.clone(), attempts.clone());
    rt.spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            a.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            if acceptor.accept(tcp).await.is_ok() {
                c.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
        }
    });

    // A fresh agent, with the real bundle and a real join token, pointed at the impostor.
    let (agent, data, bundle) = fresh_agent_pointed_at(&ca, dir.path(), impostor);
    let deadline = Instant::now() + Duration::from_secs(20);
    while attempts.load(std::sync::atomic::Ordering::Relaxed) < 2 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        attempts.load(std::sync::atomic::Ordering::Relaxed) >= 2,
        "the agent never tried"
    );
    assert_eq!(
        completed.load(std::sync::atomic::Ordering::Relaxed),
        0,
        "the agent completed a handshake with the impostor"
    );
    assert!(
        agent.log_text().contains("without the CA server mark"),
        "{}",
        agent.log_text()
    );
    assert!(
        !data.join("bundle.pem").exists() || {
            let saved = std::fs::read_to_string(data.join("bundle.pem")).unwrap();
            saved == std::fs::read_to_string(&bundle).unwrap()
        }
    );
    drop(agent);
    rt.shutdown_timeout(Duration::from_secs(1));
}

/// The node API as an impostor with the stolen intermediate serves it: every agent that
/// attests gets an agent SVID (marked, forged) and a trust bundle holding only `root`.
struct ImpostorNode {
    issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
    intermediate: Vec<u8>,
    root: Vec<u8>,
}

#[tonic::async_trait]
impl meshid_api::node::node_server::Node for ImpostorNode {
    async fn attest_join_token(
        &self,
        request: tonic::Request<meshid_api::node::AttestJoinTokenRequest>,
    ) -> Result<tonic::Response<meshid_api::node::AgentSvid>, tonic::Status> {
        let csr_der =
            rustls_pki_types::CertificateSigningRequestDer::from(request.into_inner().csr);
        let mut csr = rcgen::CertificateSigningRequestParams::from_der(&csr_der)
            .map_err(|e| tonic::Status::invalid_argument(e.to_string()))?;
        let id = "spiffe://example.org/meshid/agent/join_token/impostor";
        csr.params.subject_alt_names = vec![rcgen::SanType::URI(id.try_into().unwrap())];
        csr.params.key_usages = vec![rcgen::KeyUsagePurpose::DigitalSignature];
        csr.params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
        csr.params.custom_extensions = vec![rcgen::CustomExtension::from_oid_content(
            &meshid_api::role::CERTIFICATE_POLICIES,
            meshid_api::role::Role::Agent.policies_extension(),
        )];
        let leaf = csr
            .signed_by(&self.issuer)
            .map_err(|e| tonic::Status::internal(e.to_string()))?;
        Ok(tonic::Response::new(meshid_api::node::AgentSvid {
            spiffe_id: id.to_owned(),
            chain: vec![leaf.der().to_vec(), self.intermediate.clone()],
            expires_at: i64::MAX / 2,
            bundle: Some(meshid_api::node::Bundle {
                trust_domain: "example.org".into(),
                x509_authorities: vec![self.root.clone()],
                sequence: 99,
                ..Default::default()
            }),
        }))
    }

    async fn renew_agent(
        &self,
        _: tonic::Request<meshid_api::node::RenewAgentRequest>,
    ) -> Result<tonic::Response<meshid_api::node::AgentSvid>, tonic::Status> {
        Err(tonic::Status::unimplemented("impostor"))
    }

    type SyncStream = std::pin::Pin<
        Box<dyn futures::Stream<Item = Result<meshid_api::node::SyncUpdate, tonic::Status>> + Send>,
    >;

    async fn sync(
        &self,
        _: tonic::Request<meshid_api::node::SyncRequest>,
    ) -> Result<tonic::Response<Self::SyncStream>, tonic::Status> {
        Err(tonic::Status::unimplemented("impostor"))
    }

    async fn batch_sign_x509(
        &self,
        _: tonic::Request<meshid_api::node::BatchSignX509Request>,
    ) -> Result<tonic::Response<meshid_api::node::BatchSignX509Response>, tonic::Status> {
        Err(tonic::Status::unimplemented("impostor"))
    }

    async fn mint_jwt_svid(
        &self,
        _: tonic::Request<meshid_api::node::MintJwtSvidRequest>,
    ) -> Result<tonic::Response<meshid_api::node::MintJwtSvidResponse>, tonic::Status> {
        Err(tonic::Status::unimplemented("impostor"))
    }

    async fn report_denials(
        &self,
        _: tonic::Request<meshid_api::node::NodeDenialReport>,
    ) -> Result<tonic::Response<meshid_api::node::NodeDenialReportResponse>, tonic::Status> {
        Err(tonic::Status::unimplemented("impostor"))
    }

    async fn report_delivery(
        &self,
        _: tonic::Request<meshid_api::node::DeliveryReport>,
    ) -> Result<tonic::Response<meshid_api::node::DeliveryReportResponse>, tonic::Status> {
        Err(tonic::Status::unimplemented("impostor"))
    }
}

/// Item 8: a server the agent authenticates (here: a thief with the CA's intermediate key,
/// which can forge the server mark too) hands a fresh agent a trust bundle that keeps none of
/// the roots it trusts. The agent before the fix adopted and persisted it (trusting the
/// attacker's root from then on); now it refuses a bundle without an overlap.
#[test]
fn a_bundle_that_drops_every_trusted_root_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::start(dir.path(), &[]);
    let (issuer, intermediate) = stolen_intermediate(&ca, dir.path());
    let server_key = rcgen::KeyPair::generate().unwrap();
    let server = forged_leaf(
        &issuer,
        "spiffe://example.org/meshid/server",
        Some(meshid_api::role::Role::Server),
        &server_key,
    );
    let attacker_root = {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params.self_signed(&key).unwrap().der().to_vec()
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let mut config = rustls::ServerConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(
        vec![server.der().clone(), intermediate.clone()],
        rustls_pki_types::PrivateKeyDer::Pkcs8(server_key.serialize_der().into()),
    )
    .unwrap();
    config.alpn_protocols = vec![b"h2".to_vec()];
    let listener = rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    let impostor = listener.local_addr().unwrap().to_string();
    let acceptor = tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(config));
    let incoming =
        futures::stream::unfold((listener, acceptor), |(listener, acceptor)| async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    continue;
                };
                if let Ok(tls) = acceptor.accept(tcp).await {
                    return Some((Ok::<_, std::io::Error>(tls), (listener, acceptor)));
                }
            }
        });
    let node = ImpostorNode {
        issuer,
        intermediate: intermediate.to_vec(),
        root: attacker_root.clone(),
    };
    rt.spawn(
        tonic::transport::Server::builder()
            .add_service(meshid_api::node::node_server::NodeServer::new(node))
            .serve_with_incoming(incoming),
    );

    let (agent, data, _) = fresh_agent_pointed_at(&ca, dir.path(), impostor);
    let saved = data.join("bundle.pem");
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline
        && !agent.log_text().contains("keeps none of the roots")
        && !saved.exists()
    {
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_millis(300));
    let attacker_pem = {
        use base64::Engine as _;
        base64::engine::general_purpose::STANDARD.encode(&attacker_root)[..40].to_owned()
    };
    let persisted = std::fs::read_to_string(&saved).unwrap_or_default();
    assert!(
        !persisted.replace('\n', "").contains(&attacker_pem),
        "the agent adopted the impostor's root"
    );
    assert!(
        agent.log_text().contains("keeps none of the roots"),
        "{}",
        agent.log_text()
    );
    drop(agent);
    rt.shutdown_timeout(Duration::from_secs(1));
}

/// The kernel's open-files soft limit of process `pid`, and the size of its descriptor table.
fn descriptors_of(pid: u32) -> (u64, u64) {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let limit = meshid_api::server::open_files_limit_in(&limits).unwrap();
    (limit, meshid_tests::fd_table_size(pid))
}

/// The CA and the agent size their descriptor tables for their connection limits when they
/// start, not under load (in a process with more than one thread each growth of the table
/// waits for an RCU grace period inside the `accept` that needed it, 10–16 ms), and the CA's
/// node API asks for the largest accept queue the kernel allows, so that a fleet of agents
/// reconnecting at once is not dropped for a second.
#[test]
fn ca_and_agent_size_their_descriptor_tables_at_start() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let ca = Ca::start(dir, &[]);
    let (secret, _) = ca.join_token();
    let agent = Agent::start(dir, &ca, &secret);
    // node_limits.max_connections and the agent's max_connections, their defaults; 256 aside.
    for (name, proc, connections) in [("ca", &ca.proc, 16_384u64), ("agent", &agent.proc, 8_192)] {
        let (limit, table) = descriptors_of(proc.id());
        let want = (connections + 256).min(limit);
        let log = proc.log_text();
        assert!(
            log.contains(&format!("descriptor_table={want}"))
                || log.contains(&format!("\"descriptor_table\":{want}")),
            "{name} does not log a descriptor table of {want}:\n{log}"
        );
        assert!(
            table >= want,
            "{name}'s descriptor table holds {table}, not {want}"
        );
    }
    let port = ca.node_address.rsplit(':').next().unwrap().parse().unwrap();
    let (queue, expected) = meshid_tests::listen_queue(port, meshid_api::server::LISTEN_BACKLOG);
    assert_eq!(queue, expected, "the node API's accept queue");
    // More than tokio's 1024, wherever the kernel allows it.
    assert!(queue > 1024 || expected <= 1024);
}
