//! The node agent end to end: the real `meshid-ca` and `meshid-agent` binaries, and the
//! unmodified `spiffe` crate as the workload (WorkloadApiClient, X509 contexts, JWT-SVIDs).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use futures::StreamExt;
use meshid_tests::{uid, Agent, Ca};
use rustls_pki_types::{CertificateDer, UnixTime};
use spiffe::WorkloadApiClient;

fn create_entry(ca: &Ca, id: &str, spiffe_id: &str, parent: &str, ttl: &str) {
    ca.entry_for_this_uid(id, spiffe_id, parent, &["--x509-ttl", ttl]);
}

fn serial(der: &[u8]) -> String {
    x509_parser::parse_x509_certificate(der)
        .unwrap()
        .1
        .raw_serial_as_string()
}

fn verify(chain: &[CertificateDer<'_>], roots: &[CertificateDer<'_>]) {
    let anchors: Vec<_> = roots
        .iter()
        .map(|r| webpki::anchor_from_trusted_cert(r).unwrap().to_owned())
        .collect();
    let ee = webpki::EndEntityCert::try_from(&chain[0]).unwrap();
    let now = UnixTime::since_unix_epoch(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap(),
    );
    ee.verify_for_usage(
        webpki::ALL_VERIFICATION_ALGS,
        &anchors,
        &chain[1..],
        now,
        webpki::KeyUsage::client_auth(),
        None,
        None,
    )
    .unwrap();
}

/// Every file under `dir`, recursively.
fn files(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            files(&p, out);
        } else if p.is_file() {
            out.push(p);
        }
    }
}

async fn fetch_until(
    client: &WorkloadApiClient,
    timeout: Duration,
    pred: impl Fn(&[spiffe::X509Svid]) -> bool,
) -> Vec<spiffe::X509Svid> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Ok(svids) = client.fetch_all_x509_svids().await {
            if pred(&svids) {
                return svids;
            }
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for the expected SVIDs"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spiffe_client_against_the_agent() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().to_owned();
    let mut ca = tokio::task::block_in_place(|| Ca::start(&dir, &[]));
    let (secret, agent_id) = ca.join_token();
    create_entry(&ca, "web", "spiffe://example.org/web", &agent_id, "6s");
    let agent = tokio::task::block_in_place(|| Agent::start(&dir, &ca, &secret));
    let client = WorkloadApiClient::connect_to(agent.endpoint())
        .await
        .unwrap();
    let mut keys_seen: Vec<Vec<u8>> = Vec::new();

    // X.509-SVID and bundle, verified independently.
    let svids = fetch_until(&client, Duration::from_secs(10), |s| !s.is_empty()).await;
    let svid = &svids[0];
    assert_eq!(svid.spiffe_id().to_string(), "spiffe://example.org/web");
    keys_seen.push(svid.private_key().as_ref().to_vec());
    let bundles = client.fetch_x509_bundles().await.unwrap();
    let td = spiffe::TrustDomain::new("example.org").unwrap();
    let local = bundles.get(&td).unwrap();
    let roots: Vec<CertificateDer<'_>> = local
        .authorities()
        .iter()
        .map(|c| CertificateDer::from(c.as_ref()))
        .collect();
    let chain: Vec<CertificateDer<'_>> = svid
        .cert_chain()
        .iter()
        .map(|c| CertificateDer::from(c.as_ref()))
        .collect();
    verify(&chain, &roots);

    // JWT-SVID, validated through ValidateJWTSVID.
    let jwt = client.fetch_jwt_token(["billing"], None).await.unwrap();
    let validated = client.validate_jwt_token("billing", &jwt).await.unwrap();
    assert_eq!(
        validated.spiffe_id().to_string(),
        "spiffe://example.org/web"
    );
    assert!(client
        .validate_jwt_token("other-audience", &jwt)
        .await
        .is_err());

    // X509Source and JwtSource, as a long-running workload would use them.
    let x509_source = spiffe::X509Source::builder()
        .endpoint(agent.endpoint())
        .build()
        .await
        .unwrap();
    assert_eq!(
        x509_source.svid().unwrap().spiffe_id().to_string(),
        "spiffe://example.org/web"
    );
    assert!(x509_source.try_bundle_for_trust_domain(&td).is_some());
    let jwt_source = spiffe::JwtSource::builder()
        .endpoint(agent.endpoint())
        .build()
        .await
        .unwrap();
    let from_source = jwt_source.fetch_jwt_svid(["db"]).await.unwrap();
    assert_eq!(
        from_source.spiffe_id().to_string(),
        "spiffe://example.org/web"
    );
    // Offline validation with the JWT bundle the source fetched (the agent's JWKS).
    let offline = spiffe::JwtSvid::parse_and_validate(
        from_source.token(),
        &*jwt_source.bundle_set().unwrap(),
        &["db"],
    )
    .unwrap();
    assert_eq!(offline.spiffe_id().to_string(), "spiffe://example.org/web");

    // The operator commands and the ops endpoints.
    let agent_cli = |args: &[&str]| {
        let out = Command::new(meshid_tests::bin_dir().join("meshid-agent"))
            .args(args)
            .arg("--socket")
            .arg(&agent.socket)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "meshid-agent {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    assert!(agent_cli(&["api", "fetch", "bundle"]).contains("BEGIN CERTIFICATE"));
    assert_eq!(
        agent_cli(&["api", "fetch", "jwt", "--audience", "ops"])
            .trim()
            .split('.')
            .count(),
        3
    );
    assert!(agent_cli(&["api", "fetch", "x509"]).contains("SPIFFE ID: spiffe://example.org/web"));
    let health = Command::new(meshid_tests::bin_dir().join("meshid-agent"))
        .args(["healthcheck", "--ops-address", &agent.ops_address])
        .output()
        .unwrap();
    assert!(health.status.success());
    let (code, metrics) = meshid_tests::http_get(&agent.ops_address, "/metrics").unwrap();
    assert_eq!(code, 200);
    for needle in [
        "meshid_agent_entries 1",
        "meshid_agent_svids{state=\"current\"} 1",
        "meshid_agent_ca_connected 1",
        "meshid_agent_workload_api_calls_total{rpc=\"FetchX509SVID\",code=\"Ok\"}",
        "meshid_agent_workload_api_call_duration_seconds_bucket",
    ] {
        assert!(metrics.contains(needle), "{needle} not in {metrics}");
    }

    // Rotation: a new serial and a new key on the open stream.
    let first_serial = serial(svid.leaf().as_ref());
    let mut stream = client.stream_x509_contexts().await.unwrap();
    let rotated = tokio::time::timeout(Duration::from_secs(20), async {
        while let Some(ctx) = stream.next().await {
            let ctx = ctx.unwrap();
            let s = ctx.default_svid().unwrap();
            if serial(s.leaf().as_ref()) != first_serial {
                return s.clone();
            }
        }
        panic!("stream ended");
    })
    .await
    .expect("an SVID rotation within 20 s");
    assert_ne!(
        rotated.private_key().as_ref(),
        svid.private_key().as_ref(),
        "rotation brings a new key"
    );
    keys_seen.push(rotated.private_key().as_ref().to_vec());

    // No security header: InvalidArgument.
    let channel = meshid_api::client::connect_unix(&agent.socket)
        .await
        .unwrap();
    let mut raw =
        meshid_api::workload::spiffe_workload_api_client::SpiffeWorkloadApiClient::new(channel);
    let err = raw
        .fetch_x509svid(meshid_api::workload::X509svidRequest {})
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err}");

    // Another uid: no identity issued (needs root to switch users).
    if uid() == 0 {
        let out = Command::new("runuser")
            .args(["-u", "nobody", "--"])
            .arg(meshid_tests::bin_dir().join("meshid-agent"))
            .args(["api", "fetch", "x509", "--socket"])
            .arg(&agent.socket)
            .output()
            .unwrap();
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("no identity issued"), "{err}");
        assert!(
            agent.proc.log_text().contains("no identity issued"),
            "the agent logs the refusal"
        );
    } else {
        eprintln!("not root: skipping the other-uid check");
    }

    // A new entry reaches the waiting client; deleting it withdraws it.
    create_entry(
        &ca,
        "second",
        "spiffe://example.org/second",
        &agent_id,
        "1h",
    );
    let started = Instant::now();
    fetch_until(&client, Duration::from_secs(5), |s| {
        s.iter()
            .any(|v| v.spiffe_id().to_string().ends_with("/second"))
    })
    .await;
    eprintln!("new entry reached the client in {:?}", started.elapsed());
    ca.ok(&["entry", "delete", "second"]);
    fetch_until(&client, Duration::from_secs(5), |s| {
        s.iter()
            .all(|v| !v.spiffe_id().to_string().ends_with("/second"))
    })
    .await;

    // CA outage: the client keeps fetching valid SVIDs; after the CA returns, rotation resumes
    // without restarting the agent or the client.
    tokio::task::block_in_place(|| ca.proc.stop());
    for _ in 0..4 {
        let s = client
            .fetch_x509_svid()
            .await
            .expect("cached SVID served while the CA is down");
        let (_, leaf) = x509_parser::parse_x509_certificate(s.leaf().as_ref()).unwrap();
        assert!(leaf.validity().is_valid(), "served SVIDs are valid");
        keys_seen.push(s.private_key().as_ref().to_vec());
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let before_restart = serial(client.fetch_x509_svid().await.unwrap().leaf().as_ref());
    tokio::task::block_in_place(|| ca.restart());
    let after = fetch_until(&client, Duration::from_secs(30), |s| {
        s.first()
            .is_some_and(|v| serial(v.leaf().as_ref()) != before_restart)
    })
    .await;
    keys_seen.push(after[0].private_key().as_ref().to_vec());

    // The X509Source followed every rotation without being restarted.
    let served = x509_source.svid().unwrap();
    let (_, leaf) = x509_parser::parse_x509_certificate(served.leaf().as_ref()).unwrap();
    assert!(leaf.validity().is_valid());
    assert_ne!(
        serial(served.leaf().as_ref()),
        first_serial,
        "the source holds a rotated SVID"
    );
    x509_source.shutdown().await;
    jwt_source.shutdown().await;

    // Deleting the last entry withdraws the identity.
    ca.ok(&["entry", "delete", "web"]);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match client.fetch_x509_svid().await {
            Err(e)
                if e.to_string().contains("no identity issued")
                    || format!("{e:?}").contains("NoIdentityIssued") =>
            {
                break
            }
            _ => {
                assert!(Instant::now() < deadline, "identity not withdrawn");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }

    // No workload private key in any file the agent (or anything else here) wrote.
    let mut all = Vec::new();
    files(&dir, &mut all);
    for f in &all {
        let contents = std::fs::read(f).unwrap();
        let text = String::from_utf8_lossy(&contents);
        for k in &keys_seen {
            assert!(
                !contents.windows(k.len()).any(|w| w == k.as_slice()),
                "workload key (DER) in {}",
                f.display()
            );
            use base64::Engine as _;
            let b64 = base64::engine::general_purpose::STANDARD.encode(k);
            assert!(
                !text.contains(&b64[..60]),
                "workload key (base64) in {}",
                f.display()
            );
        }
    }
    assert!(
        all.iter().any(|f| f.ends_with("agent-key.pem")),
        "the agent's own key is persisted"
    );
}

/// An agent restarted with a `join_token_file` that is gone (a used token is deleted, or a
/// Kubernetes init step wrote none) starts on the identity in its data directory; without an
/// identity, the same configuration fails with a message saying what is missing.
#[test]
fn restart_with_missing_join_token_file_uses_the_stored_identity() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let ca = Ca::start(dir, &[]);
    let (secret, _) = ca.join_token();
    let mut agent = Agent::start(dir, &ca, &secret);
    agent.proc.stop();
    let config = dir.join("agent.toml");
    std::fs::write(
        &config,
        format!(
            "join_token_file = \"{}\"\n",
            dir.join("no-such-token").display()
        ),
    )
    .unwrap();
    let run = |data_dir: &Path, log: &str| {
        let args: Vec<String> = [
            "run",
            "--config",
            &config.display().to_string(),
            "--trust-domain",
            "example.org",
            "--server-address",
            &ca.node_address,
            "--trust-bundle",
            &dir.join("bundle.pem").display().to_string(),
            "--data-dir",
            &data_dir.display().to_string(),
            "--socket-path",
            &agent.socket.display().to_string(),
            "--ops-address",
            &agent.ops_address,
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        meshid_tests::Proc::start("meshid-agent", "meshid-agent", &args, dir.join(log))
    };
    let mut restarted = run(&agent.data_dir, "agent-restarted.log");
    meshid_tests::wait_for(Duration::from_secs(30), "the restarted agent", || {
        restarted.check_alive();
        (meshid_tests::http_get(&agent.ops_address, "/readyz")?.0 == 200).then_some(())
    });
    restarted.stop();

    let fresh = run(&dir.join("empty-data"), "agent-fresh.log");
    meshid_tests::wait_for(
        Duration::from_secs(20),
        "the fresh agent's complaint",
        || fresh.log_text().contains("no join token").then_some(()),
    );
}

/// `meshid-ca entry rotate` replaces a workload's SVID at once, long before it is due: the
/// workload's open stream (the unmodified `spiffe` crate) gets a new certificate with a new
/// key within a second of the command, and its other SVID is left alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn entry_rotate_replaces_the_svid_at_the_workload_at_once() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().to_owned();
    let ca = tokio::task::block_in_place(|| Ca::start(&dir, &[]));
    let (secret, agent_id) = ca.join_token();
    // An hour: nothing is due for rotation during the test.
    create_entry(&ca, "web", "spiffe://example.org/web", &agent_id, "1h");
    create_entry(&ca, "other", "spiffe://example.org/other", &agent_id, "1h");
    let agent = tokio::task::block_in_place(|| Agent::start(&dir, &ca, &secret));
    let client = WorkloadApiClient::connect_to(agent.endpoint())
        .await
        .unwrap();
    let svids: Vec<std::sync::Arc<spiffe::X509Svid>> =
        fetch_until(&client, Duration::from_secs(10), |s| s.len() == 2)
            .await
            .into_iter()
            .map(std::sync::Arc::new)
            .collect();
    fn by_id<S: AsRef<spiffe::X509Svid>>(svids: &[S], id: &str) -> spiffe::X509Svid {
        svids
            .iter()
            .map(AsRef::as_ref)
            .find(|s| s.spiffe_id().to_string() == id)
            .unwrap()
            .clone()
    }
    let web = by_id(&svids, "spiffe://example.org/web");
    let other = by_id(&svids, "spiffe://example.org/other");
    let mut stream = client.stream_x509_contexts().await.unwrap();
    stream.next().await.unwrap().unwrap();

    let asked = Instant::now();
    let out =
        tokio::task::block_in_place(|| ca.ok(&["entry", "rotate", "web", "--reason", "test"]));
    assert!(out.contains("revision 2"), "{out}");
    let ctx = tokio::time::timeout(Duration::from_secs(1), async {
        loop {
            let ctx = stream.next().await.unwrap().unwrap();
            let s = by_id(ctx.svids(), "spiffe://example.org/web");
            if serial(s.leaf().as_ref()) != serial(web.leaf().as_ref()) {
                return ctx;
            }
        }
    })
    .await
    .expect("the rotated SVID reaches the open stream within 1 s");
    let took = asked.elapsed();
    let new_web = by_id(ctx.svids(), "spiffe://example.org/web");
    assert_ne!(new_web.private_key().as_ref(), web.private_key().as_ref());
    let new_other = by_id(ctx.svids(), "spiffe://example.org/other");
    assert_eq!(
        serial(new_other.leaf().as_ref()),
        serial(other.leaf().as_ref()),
        "the other entry's SVID is untouched"
    );
    let bundles = client.fetch_x509_bundles().await.unwrap();
    let td = spiffe::TrustDomain::new("example.org").unwrap();
    let roots: Vec<CertificateDer<'_>> = bundles
        .get(&td)
        .unwrap()
        .authorities()
        .iter()
        .map(|c| CertificateDer::from(c.as_ref().to_vec()))
        .collect();
    let chain: Vec<CertificateDer<'_>> = new_web
        .cert_chain()
        .iter()
        .map(|c| CertificateDer::from(c.as_ref().to_vec()))
        .collect();
    verify(&chain, &roots);
    println!("entry rotate to the workload's stream: {took:?}");
    // The CA measured it too: the entry's new SVID issued after the rotation.
    let effect = tokio::task::block_in_place(|| {
        crate::effect(&ca, "entry.rotated", 0, Duration::from_secs(5))
    });
    assert_eq!(effect["entry_id"], "web", "{effect}");
    assert!(effect["after_ms"].as_u64().unwrap() < 1000, "{effect}");
}

/// `meshid-ca ca taint`: with the real agent and the unmodified `spiffe` crate's open stream,
/// every SVID signed by the tainted intermediate is replaced at once (1 h lifetimes: nothing
/// was due), by a fresh intermediate, and verifies; `ca status` then counts none left and
/// the audit log records the measured time to clean.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn taint_replaces_what_the_key_signed_at_once() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().to_owned();
    let config = dir.join("ca.toml");
    std::fs::write(&config, "[ca]\nrotation_interval = \"1s\"\n").unwrap();
    let ca = tokio::task::block_in_place(|| {
        Ca::start(&dir, &["--config", &config.display().to_string()])
    });
    let (secret, agent_id) = ca.join_token();
    create_entry(&ca, "web", "spiffe://example.org/web", &agent_id, "1h");
    create_entry(&ca, "other", "spiffe://example.org/other", &agent_id, "1h");
    let agent = tokio::task::block_in_place(|| Agent::start(&dir, &ca, &secret));
    let client = WorkloadApiClient::connect_to(agent.endpoint())
        .await
        .unwrap();
    fetch_until(&client, Duration::from_secs(10), |s| s.len() == 2).await;
    let mut stream = client.stream_x509_contexts().await.unwrap();
    let first = stream.next().await.unwrap().unwrap();
    let issuer_of = |s: &spiffe::X509Svid| s.cert_chain()[1].as_ref().to_vec();
    let tainted_cert = issuer_of(&first.svids()[0]);
    let tainted = tokio::task::block_in_place(|| crate::active_key(&ca, "x509_intermediate"));

    let asked = Instant::now();
    let out = tokio::task::block_in_place(|| ca.ok(&["ca", "taint", &tainted, "--reason", "e2e"]));
    assert!(out.contains("Tainted x509_intermediate"), "{out}");
    let ctx = tokio::time::timeout(Duration::from_secs(2), async {
        loop {
            let ctx = stream.next().await.unwrap().unwrap();
            if ctx.svids().len() == 2 && ctx.svids().iter().all(|s| issuer_of(s) != tainted_cert) {
                return ctx;
            }
        }
    })
    .await
    .expect("both SVIDs replaced on the open stream within 2 s");
    let took = asked.elapsed();
    let roots: Vec<CertificateDer<'_>> = client
        .fetch_x509_bundles()
        .await
        .unwrap()
        .get(&spiffe::TrustDomain::new("example.org").unwrap())
        .unwrap()
        .authorities()
        .iter()
        .map(|c| CertificateDer::from(c.as_ref().to_vec()))
        .collect();
    for s in ctx.svids() {
        let chain: Vec<CertificateDer<'_>> = s
            .cert_chain()
            .iter()
            .map(|c| CertificateDer::from(c.as_ref().to_vec()))
            .collect();
        verify(&chain, &roots);
    }
    // The CA counts nothing left, and records when it was clean.
    let cleared = tokio::task::block_in_place(|| {
        meshid_tests::wait_for(Duration::from_secs(15), "the taint to clear", || {
            let status: serde_json::Value =
                serde_json::from_str(&ca.ok(&["ca", "status", "--output", "json"])).unwrap();
            let t = status["taints"]
                .as_array()?
                .iter()
                .find(|t| t["key_id"] == tainted.as_str())?
                .clone();
            (t["remaining"] == 0 && t["cleared_after_s"].is_i64()).then_some(t)
        })
    });
    assert!(
        cleared["replaced"].as_u64().unwrap() >= 3,
        "2 entries and the agent: {cleared}"
    );
    let text = tokio::task::block_in_place(|| ca.ok(&["ca", "status"]));
    assert!(
        text.contains("TAINTED") && text.contains("nothing it signed is left"),
        "{text}"
    );
    println!("taint to both SVIDs replaced on the workload's stream: {took:?}; {cleared}");
}

/// `meshid-ca agent rotate`: the real agent renews its own SVID (the CA's record shows a new
/// serial) and its workload's SVID is replaced, within seconds, long before either is due.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_rotate_renews_the_agent_and_its_workloads() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().to_owned();
    let ca = tokio::task::block_in_place(|| Ca::start(&dir, &[]));
    let (secret, agent_id) = ca.join_token();
    create_entry(&ca, "web", "spiffe://example.org/web", &agent_id, "1h");
    let agent = tokio::task::block_in_place(|| Agent::start(&dir, &ca, &secret));
    let client = WorkloadApiClient::connect_to(agent.endpoint())
        .await
        .unwrap();
    let web = fetch_until(&client, Duration::from_secs(10), |s| !s.is_empty()).await;
    let web_serial = serial(web[0].leaf().as_ref());
    let agent_serial = |ca: &Ca| -> String {
        let out = ca.ok(&["agent", "show", &agent_id, "--output", "json"]);
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        v["serial"].as_str().unwrap().to_owned()
    };
    let before = tokio::task::block_in_place(|| agent_serial(&ca));

    let out =
        tokio::task::block_in_place(|| ca.ok(&["agent", "rotate", &agent_id, "--reason", "test"]));
    assert!(out.contains("1 entries"), "{out}");
    fetch_until(&client, Duration::from_secs(5), |s| {
        s.len() == 1 && serial(s[0].leaf().as_ref()) != web_serial
    })
    .await;
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let now = tokio::task::block_in_place(|| agent_serial(&ca));
        if now != before {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the agent did not renew its SVID"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The CA measured it: the agent renewed its SVID and its entry's was re-issued. (Agent
    // rotate records its entries' rotations but watches them as one step.)
    let effect = tokio::task::block_in_place(|| {
        crate::effect(&ca, "agent.rotated", 0, Duration::from_secs(5))
    });
    assert_eq!(effect["spiffe_id"], agent_id.as_str(), "{effect}");
    assert_eq!(effect["entries"], 1, "{effect}");
    assert!(
        tokio::task::block_in_place(|| crate::audit(&ca, "entry.rotated.effective")).is_empty()
    );
    // And it keeps working with its new SVID: another rotation goes through.
    let current = fetch_until(&client, Duration::from_secs(5), |s| s.len() == 1).await;
    let current = serial(current[0].leaf().as_ref());
    tokio::task::block_in_place(|| ca.ok(&["entry", "rotate", "web"]));
    fetch_until(&client, Duration::from_secs(5), |s| {
        s.len() == 1 && serial(s[0].leaf().as_ref()) != current
    })
    .await;
    assert!(agent
        .proc
        .log_text()
        .contains("the CA asks for this agent's SVID to be renewed now"));
}

/// What the open X.509 streams have been handed: the agent's
/// `meshid_agent_bundle_sequence_delivered` is the bundle sequence it holds once every open
/// stream (the unmodified `spiffe` crate's) has taken a message carrying it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delivered_bundle_sequence_follows_the_open_streams() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().to_owned();
    let ca = tokio::task::block_in_place(|| Ca::start(&dir, &[]));
    let (secret, agent_id) = ca.join_token();
    create_entry(&ca, "web", "spiffe://example.org/web", &agent_id, "1h");
    let agent = tokio::task::block_in_place(|| Agent::start(&dir, &ca, &secret));
    let metric = |name: &str| -> f64 {
        let text = meshid_tests::http_get(&agent.ops_address, "/metrics")
            .unwrap()
            .1;
        meshid_tests::metric_value(&text, name, &[])
    };
    let held = metric("meshid_agent_bundle_sequence");
    assert!(held >= 1.0, "{held}");
    assert_eq!(metric("meshid_agent_workload_api_x509_streams"), 0.0);
    assert_eq!(metric("meshid_agent_bundle_sequence_delivered"), held);

    let client = WorkloadApiClient::connect_to(agent.endpoint())
        .await
        .unwrap();
    fetch_until(&client, Duration::from_secs(10), |s| !s.is_empty()).await;
    let mut stream = client.stream_x509_contexts().await.unwrap();
    stream.next().await.unwrap().unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let streams = metric("meshid_agent_workload_api_x509_streams");
        let delivered = metric("meshid_agent_bundle_sequence_delivered");
        if streams == 1.0 && delivered == held {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "streams {streams}, delivered {delivered}, held {held}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The agent reports it to the CA: `agent show` has it, and `ca status` counts the agent.
    let shown = |ca: &Ca| -> serde_json::Value {
        serde_json::from_str(&ca.ok(&["agent", "show", &agent_id, "--output", "json"])).unwrap()
    };
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let a = tokio::task::block_in_place(|| shown(&ca));
        if a["delivered_bundle_sequence"].as_f64() == Some(held) && a["x509_streams"] == 1 {
            break;
        }
        assert!(Instant::now() < deadline, "the CA has {a}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let status: serde_json::Value = serde_json::from_str(&tokio::task::block_in_place(|| {
        ca.ok(&["ca", "status", "--output", "json"])
    }))
    .unwrap();
    assert_eq!(
        (
            status["agents_delivered"].as_u64(),
            status["agents_live"].as_u64()
        ),
        (Some(1), Some(1))
    );

    drop(stream);
    let deadline = Instant::now() + Duration::from_secs(5);
    while metric("meshid_agent_workload_api_x509_streams") != 0.0 {
        assert!(
            Instant::now() < deadline,
            "the closed stream is still counted"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while tokio::task::block_in_place(|| shown(&ca))["x509_streams"] != 0 {
        assert!(
            Instant::now() < deadline,
            "the CA still counts the closed stream"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A CA address whose server this agent cannot authenticate (here another trust domain's CA
/// with its own root, as a server restored from an old backup would be) does not stop the
/// search: the agent goes on to the next address and attests there.
#[test]
fn an_untrusted_first_address_does_not_stop_the_failover() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    std::fs::create_dir_all(dir.join("stranger")).unwrap();
    let stranger = Ca::start(&dir.join("stranger"), &[]);
    let ca = Ca::start(dir, &[]);
    let (secret, _) = ca.join_token();
    let bundle = dir.join("bundle.pem");
    std::fs::write(&bundle, ca.ok(&["bundle", "show"])).unwrap();
    let config = dir.join("agent.toml");
    std::fs::write(
        &config,
        format!("extra_server_addresses = [\"{}\"]\n", ca.node_address),
    )
    .unwrap();
    let ops = format!("127.0.0.1:{}", meshid_tests::free_port());
    let sock_dir = dir.join("sock");
    std::fs::create_dir_all(&sock_dir).unwrap();
    let mut args = meshid_tests::agent_run_args(
        &stranger,
        &bundle,
        &dir.join("agent-data"),
        &sock_dir.join("api.sock"),
        &ops,
    );
    args.extend([
        "--config".into(),
        config.display().to_string(),
        "--join-token".into(),
        secret,
    ]);
    let mut agent =
        meshid_tests::Proc::start("meshid-agent", "meshid-agent", &args, dir.join("agent.log"));
    meshid_tests::wait_for(Duration::from_secs(30), "the agent to attest", || {
        agent.check_alive();
        (meshid_tests::http_get(&ops, "/readyz")?.0 == 200).then_some(())
    });
    assert!(
        agent.log_text().contains("attested to the CA"),
        "{}",
        agent.log_text()
    );
}

/// The central policy reaches the agent: `meshid-ca policy apply` at the CA, and the agent
/// holds the new revision within a second (`meshid_agent_policy_revision`; the CA's `agent
/// show` says so), keeps it in its data directory (mode 0600, policy and no secrets), serves a
/// workload (as meshid-proxy will) only the rules whose `to` is that workload, at once on every
/// new revision, and holds it again after a restart while the CA is down.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_central_policy_reaches_the_agent_and_outlives_a_restart_without_the_ca() {
    use meshid_api::policy::policy_delivery_client::PolicyDeliveryClient;
    use std::os::unix::fs::PermissionsExt as _;
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().to_owned();
    let mut ca = tokio::task::block_in_place(|| Ca::start(&dir, &[]));
    let (secret, agent_id) = ca.join_token();
    create_entry(&ca, "api", "spiffe://example.org/api", &agent_id, "1h");
    let mut agent = tokio::task::block_in_place(|| Agent::start(&dir, &ca, &secret));
    let revision = |ops: &str| -> Option<f64> {
        let text = meshid_tests::http_get(ops, "/metrics")?.1;
        Some(meshid_tests::metric_value(
            &text,
            "meshid_agent_policy_revision",
            &[],
        ))
    };
    assert_eq!(revision(&agent.ops_address), Some(0.0));

    // This process is the workload `api`: its policy stream says "none yet" first.
    let channel = meshid_api::client::connect_unix(&agent.socket)
        .await
        .unwrap();
    let mut req = tonic::Request::new(meshid_api::policy::WatchPolicyRequest {});
    req.metadata_mut()
        .insert("workload.spiffe.io", "true".parse().unwrap());
    let mut stream = PolicyDeliveryClient::new(channel)
        .watch(req)
        .await
        .unwrap()
        .into_inner();
    let first = stream.message().await.unwrap().unwrap();
    assert_eq!(first.revision, 0);
    assert_eq!(first.spiffe_ids, ["spiffe://example.org/api"]);
    assert!(first.policy.contains("rules: []"), "{}", first.policy);

    let file = dir.join("team-a.yaml");
    let text = "name: team-a\ndefault: deny\nrules:\n  - name: web-to-api\n    from: [\"spiffe://example.org/web\"]\n    to: [\"spiffe://example.org/api\"]\n  - name: batch-to-db\n    from: [\"spiffe://example.org/batch\"]\n    to: [\"spiffe://example.org/db\"]\n";
    std::fs::write(&file, text).unwrap();
    let asked = Instant::now();
    tokio::task::block_in_place(|| ca.ok(&["policy", "apply", file.to_str().unwrap()]));
    let update = tokio::time::timeout(Duration::from_secs(1), stream.message())
        .await
        .expect("the new revision within a second")
        .unwrap()
        .unwrap();
    eprintln!(
        "policy apply -> the workload's policy stream: {:?}",
        asked.elapsed()
    );
    assert_eq!(update.revision, 1);
    // Only what concerns `api`; the database rule is not shown to it.
    assert!(update.policy.contains("web-to-api"), "{}", update.policy);
    assert!(
        !update.policy.contains("batch") && !update.policy.contains("db"),
        "{}",
        update.policy
    );
    let parsed = meshid_policy::Policy::parse(&update.policy, "from-agent.yaml").unwrap();
    assert_eq!(parsed.rule_count(), 1);
    assert_eq!(revision(&agent.ops_address), Some(1.0));
    // The CA knows which revision the agent holds (its delivery report).
    meshid_tests::wait_for(Duration::from_secs(2), "the CA showing revision 1", || {
        let shown: serde_json::Value = serde_json::from_str(&tokio::task::block_in_place(|| {
            ca.ok(&["agent", "show", &agent_id, "--output", "json"])
        }))
        .ok()?;
        (shown["policy_revision"] == 1).then_some(())
    });
    let kept = agent.data_dir.join("policy.json");
    let mode = std::fs::metadata(&kept).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let json: serde_json::Value = serde_json::from_slice(&std::fs::read(&kept).unwrap()).unwrap();
    assert_eq!(json["revision"], 1);
    assert_eq!(json["documents"]["team-a"], text);

    // The CA away, the agent restarted: it holds revision 1 again, read back from its data
    // directory.
    ca.proc.stop();
    agent.proc.stop();
    let args = meshid_tests::agent_run_args(
        &ca,
        &dir.join("bundle.pem"),
        &agent.data_dir,
        &agent.socket,
        &agent.ops_address,
    );
    let _again = meshid_tests::Proc::start(
        "meshid-agent",
        "meshid-agent",
        &args,
        dir.join("agent-without-ca.log"),
    );
    meshid_tests::wait_for(
        Duration::from_secs(10),
        "revision 1 at the restarted agent",
        || (revision(&agent.ops_address)? == 1.0).then_some(()),
    );
}
