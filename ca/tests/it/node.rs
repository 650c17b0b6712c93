//! The node API end to end: a real CA (`server::run` with every listener) in this process, and
//! real tonic clients over TLS built with `meshid_api::tls`, as an agent connects.
//!
//! Eviction ends an agent's open Sync stream with PermissionDenied (it does not merely go
//! quiet), and every later call of that agent is refused.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use crate::pg;

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use meshid_api::node::node_client::NodeClient;
use meshid_api::node::{self, SyncUpdate};
use meshid_api::tls::{self, ExpectedId};
use meshid_ca::config::{Config, RawConfig};
use meshid_ca::entry::EntrySpec;
use meshid_ca::server::{self, Listeners};
use meshid_ca::service::{Ca, CaEvent};
use meshid_ca::store::AgentRecord;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, UnixTime};
use spiffe::SpiffeId;
use tokio::sync::oneshot;
use tonic::transport::Channel;
use tonic::{Code, Streaming};

const BIN: &str = env!("CARGO_BIN_EXE_meshid-ca");
const SERVER_ID: &str = "spiffe://example.org/meshid/server";
/// How long a pushed change may take to arrive.
const PUSH: Duration = Duration::from_secs(1);

/// Runs a test body with a time limit, so a hang fails instead of blocking the suite.
async fn bounded(body: impl Future<Output = ()>) {
    tokio::time::timeout(Duration::from_secs(60), body)
        .await
        .expect("test timed out");
}

/// A CA serving the admin socket, the node API and the ops listener on free ports.
struct TestCa {
    ca: Ca,
    node: SocketAddr,
    socket: PathBuf,
    stop: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
    _dir: tempfile::TempDir,
}

impl TestCa {
    async fn start() -> TestCa {
        Self::start_with(|_| {}).await
    }

    async fn start_with(tune: impl FnOnce(&mut RawConfig)) -> TestCa {
        let dir = tempfile::tempdir().unwrap();
        let mut raw = RawConfig {
            trust_domain: Some("example.org".into()),
            data_dir: Some(dir.path().join("data")),
            ..Default::default()
        };
        tune(&mut raw);
        let config = Config::try_from(raw).unwrap();
        let ca = server::build(&config).await.unwrap();
        let admin =
            meshid_api::uds::bind(&config.admin_socket, meshid_api::uds::Access::Owner).unwrap();
        let node = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let ops = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let node_addr = node.local_addr().unwrap();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(server::run(
            ca.clone(),
            Listeners {
                admin,
                node,
                ops,
                node_limits: meshid_ca::node::admission::Limits::default(),
                bundle_endpoint: None,
                web_roots: meshid_ca::federation::fetch::WebRoots::none(),
                audit: meshid_ca::audit::ship::Shipping {
                    summary_interval: Duration::from_millis(200),
                    ..Default::default()
                },
                console: None,
            },
            async move {
                let _ = stopped.await;
            },
        ));
        let test_ca = TestCa {
            ca,
            node: node_addr,
            socket: config.admin_socket.clone(),
            stop: Some(stop),
            task: Some(task),
            _dir: dir,
        };
        // Serving once an anonymous client completes a handshake.
        for _ in 0..100 {
            if test_ca.try_anonymous().await.is_ok() {
                return test_ca;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("node API did not come up");
    }

    /// Shuts down and checks that the server stops in time, open streams or not.
    async fn stop(mut self) {
        let _ = self.stop.take().unwrap().send(());
        let task = self.task.take().unwrap();
        tokio::time::timeout(Duration::from_secs(15), task)
            .await
            .expect("CA did not stop in time")
            .unwrap()
            .unwrap();
    }

    fn roots(&self) -> Vec<CertificateDer<'static>> {
        self.ca.authority.bundle().x509_authorities
    }

    async fn channel(
        &self,
        identity: Option<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)>,
    ) -> Result<Channel, tls::TlsError> {
        let config = tls::client_config(
            self.roots(),
            ExpectedId::Exact(SpiffeId::new(SERVER_ID).unwrap()),
            identity,
        )?;
        tls::connect(&self.node.to_string(), Arc::new(config)).await
    }

    async fn try_anonymous(&self) -> Result<NodeClient<Channel>, tls::TlsError> {
        Ok(NodeClient::new(self.channel(None).await?))
    }

    async fn anonymous(&self) -> NodeClient<Channel> {
        self.try_anonymous().await.unwrap()
    }

    async fn token(&self) -> String {
        self.ca
            .generate_token(0, "admin:test")
            .await
            .unwrap()
            .secret()
            .to_owned()
    }

    /// Attests with a fresh token and connects with the agent SVID.
    async fn agent(&self) -> Agent {
        let token = self.token().await;
        let (csr, key) = csr();
        let svid = self
            .anonymous()
            .await
            .attest_join_token(node::AttestJoinTokenRequest { token, csr })
            .await
            .unwrap()
            .into_inner();
        self.connect_agent(svid, key).await
    }

    async fn connect_agent(&self, svid: node::AgentSvid, key: PrivateKeyDer<'static>) -> Agent {
        let chain: Vec<CertificateDer<'static>> =
            svid.chain.iter().map(|c| c.clone().into()).collect();
        let client = NodeClient::new(self.channel(Some((chain, key.clone_key()))).await.unwrap());
        Agent {
            id: svid.spiffe_id.clone(),
            svid,
            client,
        }
    }

    async fn entry(&self, id: &str, parent: &str) -> meshid_ca::entry::RegistrationEntry {
        self.ca
            .create_entry(
                &EntrySpec {
                    id: Some(id.into()),
                    spiffe_id: format!("spiffe://example.org/workload/{id}"),
                    parent_id: parent.into(),
                    selectors: vec!["unix:uid:1000".into()],
                    ..Default::default()
                },
                "admin:test",
            )
            .await
            .unwrap()
    }

    /// Runs `meshid-ca <args> --socket <socket>` and returns its stdout; panics on failure.
    fn cli(&self, args: &[&str]) -> String {
        let out = Command::new(BIN)
            .args(args)
            .arg("--socket")
            .arg(&self.socket)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "meshid-ca {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }
}

/// An attested agent connected with its SVID.
struct Agent {
    id: String,
    svid: node::AgentSvid,
    client: NodeClient<Channel>,
}

impl Agent {
    async fn sync(&mut self) -> Streaming<SyncUpdate> {
        self.client
            .sync(node::SyncRequest {})
            .await
            .unwrap()
            .into_inner()
    }
}

/// A fresh P-256 key and a CSR over it.
fn csr() -> (Vec<u8>, PrivateKeyDer<'static>) {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let csr = rcgen::CertificateParams::new(Vec::<String>::new())
        .unwrap()
        .serialize_request(&key)
        .unwrap();
    (
        csr.der().to_vec(),
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
    )
}

/// The next message of a sync stream, which must come within [`PUSH`].
async fn next(stream: &mut Streaming<SyncUpdate>) -> SyncUpdate {
    tokio::time::timeout(PUSH, stream.message())
        .await
        .expect("no sync update within 1s")
        .expect("sync stream failed")
        .expect("sync stream ended")
}

/// Asserts that nothing arrives on the stream for a short while.
async fn quiet(stream: &mut Streaming<SyncUpdate>) {
    if let Ok(msg) = tokio::time::timeout(Duration::from_millis(300), stream.message()).await {
        panic!("unexpected sync message: {msg:?}");
    }
}

fn ids(update: &SyncUpdate) -> Vec<&str> {
    update.upserts.iter().map(|e| e.id.as_str()).collect()
}

/// Path-validates a chain to the roots with rustls-webpki (clientAuth) and returns the leaf's
/// SPIFFE ID.
fn verify_chain(chain: &[Vec<u8>], roots: &[CertificateDer<'static>]) -> String {
    let certs: Vec<CertificateDer<'static>> = chain.iter().map(|c| c.clone().into()).collect();
    let anchors: Vec<_> = roots
        .iter()
        .map(|r| webpki::anchor_from_trusted_cert(r).unwrap())
        .collect();
    let leaf = webpki::EndEntityCert::try_from(&certs[0]).unwrap();
    leaf.verify_for_usage(
        rustls::crypto::aws_lc_rs::default_provider()
            .signature_verification_algorithms
            .all,
        &anchors,
        &certs[1..],
        UnixTime::now(),
        webpki::KeyUsage::client_auth(),
        None,
        None,
    )
    .unwrap();
    tls::verify::spiffe_id_of(&certs[0]).unwrap().to_string()
}

fn assert_denied(status: tonic::Status, why: &str) {
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    assert!(status.message().contains(why), "{status:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attest_with_join_token_issues_an_agent_svid() {
    bounded(async {
        let ca = TestCa::start().await;
        let token = ca.ca.generate_token(0, "admin:test").await.unwrap();
        let (csr, _key) = csr();
        let svid = ca
            .anonymous()
            .await
            .attest_join_token(node::AttestJoinTokenRequest {
                token: token.secret().to_owned(),
                csr,
            })
            .await
            .unwrap()
            .into_inner();
        let expected = format!(
            "spiffe://example.org/meshid/agent/join_token/{}",
            token.record.id
        );
        assert_eq!(svid.spiffe_id, expected);
        assert_eq!(verify_chain(&svid.chain, &ca.roots()), expected);
        let bundle = svid.bundle.as_ref().unwrap();
        assert_eq!(bundle.trust_domain, "example.org");
        let roots: Vec<Vec<u8>> = ca.roots().iter().map(|r| r.to_vec()).collect();
        assert_eq!(bundle.x509_authorities, roots);
        let jwks: serde_json::Value = serde_json::from_str(&bundle.jwt_authorities_json).unwrap();
        assert!(!jwks["keys"].as_array().unwrap().is_empty(), "{jwks}");
        // The CA's default X.509 lifetime (1h).
        let left = svid.expires_at - meshid_ca::unix_now();
        assert!((3500..=3600).contains(&left), "{left}");

        let record = ca
            .ca
            .store
            .get_agent(&SpiffeId::new(&expected).unwrap())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(record.attestation_type, "join_token");
        assert_eq!(record.expires_at, svid.expires_at);
        assert!(!record.banned);
        let (_, leaf) = x509_parser::parse_x509_certificate(&svid.chain[0]).unwrap();
        assert_eq!(record.serial, hex::encode(leaf.raw_serial()));
        let kinds: Vec<String> = ca
            .ca
            .store
            .audit_records(0, 1000)
            .await
            .unwrap()
            .into_iter()
            .map(|r| r.kind)
            .collect();
        assert!(kinds.contains(&"token.used".to_owned()), "{kinds:?}");
        assert!(kinds.contains(&"agent.attested".to_owned()), "{kinds:?}");
        ca.stop().await;
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_used_and_expired_tokens_are_refused_alike() {
    bounded(async {
        let ca = TestCa::start().await;
        let mut client = ca.anonymous().await;
        let attest = |token: String| node::AttestJoinTokenRequest {
            token,
            csr: csr().0,
        };

        // A malformed CSR is refused before the token is used, so the token still works.
        let token = ca.token().await;
        let status = client
            .attest_join_token(node::AttestJoinTokenRequest {
                token: token.clone(),
                csr: b"not a csr".to_vec(),
            })
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
        client
            .attest_join_token(attest(token.clone()))
            .await
            .unwrap();

        // Used, unknown and expired: one answer that does not say which.
        let expired = meshid_ca::token::JoinToken::generate(
            meshid_ca::unix_now() - 100,
            Duration::from_secs(10),
        );
        ca.ca
            .store
            .create_join_token(
                &expired.record,
                &meshid_ca::audit::AuditEvent::new("token.created", "test", serde_json::json!({})),
            )
            .await
            .unwrap();
        let mut messages = Vec::new();
        for t in [
            token,
            "no-such-token".to_owned(),
            expired.secret().to_owned(),
        ] {
            let status = client
                .attest_join_token(attest(t.clone()))
                .await
                .unwrap_err();
            assert_denied(status.clone(), "invalid, expired or already used");
            assert!(!status.message().contains(&t), "{status:?}");
            messages.push(status.message().to_owned());
        }
        assert!(messages.windows(2).all(|w| w[0] == w[1]), "{messages:?}");
        ca.stop().await;
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_need_an_attested_agent_certificate() {
    bounded(async {
        let ca = TestCa::start().await;
        let mut anonymous = ca.anonymous().await;
        let no_cert = "needs a client certificate";
        assert_denied(
            anonymous.sync(node::SyncRequest {}).await.err().unwrap(),
            no_cert,
        );
        assert_denied(
            anonymous
                .renew_agent(node::RenewAgentRequest { csr: csr().0 })
                .await
                .unwrap_err(),
            no_cert,
        );
        assert_denied(
            anonymous
                .batch_sign_x509(node::BatchSignX509Request { requests: vec![] })
                .await
                .unwrap_err(),
            no_cert,
        );
        assert_denied(
            anonymous
                .mint_jwt_svid(node::MintJwtSvidRequest {
                    entry_id: "x".into(),
                    audience: vec!["a".into()],
                })
                .await
                .unwrap_err(),
            no_cert,
        );

        // A valid SVID of this trust domain that is not an agent's, and one shaped like an
        // agent's that never attested (minted by an operator): both refused.
        // (An operator can no longer mint the second through the admin API: its path is
        // reserved. It is signed here with the CA's own keys, as a stolen key would.)
        for (id, why) in [
            (
                "spiffe://example.org/workload/web",
                "is not an agent identity",
            ),
            (
                "spiffe://example.org/meshid/agent/forged",
                "is not attested",
            ),
        ] {
            let (csr, key) = csr();
            let minted = ca.ca.mint_x509(id, &csr, 0, &[], "admin:test").await;
            let svid = if id.contains("/meshid/") {
                assert!(minted.is_err(), "{id} minted through the admin path");
                let spiffe_id = spiffe::SpiffeId::new(id).unwrap();
                ca.ca
                    .authority
                    .sign_x509_svid(&csr, &spiffe_id, &[], None)
                    .unwrap()
            } else {
                minted.unwrap()
            };
            let mut client =
                NodeClient::new(ca.channel(Some((svid.chain.clone(), key))).await.unwrap());
            assert_denied(client.sync(node::SyncRequest {}).await.err().unwrap(), why);
        }
        ca.stop().await;
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sync_sends_the_agents_entries_then_each_change() {
    bounded(async {
        let ca = TestCa::start().await;
        let mut a = ca.agent().await;
        let mut b = ca.agent().await;
        ca.entry("a1", &a.id).await;
        ca.entry("a2", &a.id).await;
        ca.entry("b1", &b.id).await;

        let mut a_stream = a.sync().await;
        let first = next(&mut a_stream).await;
        assert!(first.full);
        assert_eq!(ids(&first), ["a1", "a2"]);
        assert!(first.deleted_ids.is_empty());
        assert_eq!(
            first.bundle.as_ref().unwrap().sequence,
            ca.ca.authority.bundle().sequence
        );
        let mut b_stream = b.sync().await;
        let first = next(&mut b_stream).await;
        assert!(first.full);
        assert_eq!(ids(&first), ["b1"]);

        // Created for A: pushed to A, not to B.
        ca.entry("a3", &a.id).await;
        let up = next(&mut a_stream).await;
        assert!(!up.full);
        assert_eq!(ids(&up), ["a3"]);
        assert!(up.bundle.is_none());
        quiet(&mut b_stream).await;

        // Updated.
        let mut spec = EntrySpec::from(
            &ca.ca
                .store
                .get_entry(&"a3".parse().unwrap())
                .await
                .unwrap()
                .unwrap(),
        );
        spec.selectors = vec!["unix:uid:2000".into()];
        ca.ca.update_entry(&spec, 0, "admin:test").await.unwrap();
        let up = next(&mut a_stream).await;
        assert_eq!(ids(&up), ["a3"]);
        assert_eq!(up.upserts[0].selectors, ["unix:uid:2000"]);
        assert_eq!(up.upserts[0].revision, 2);

        // Deleted.
        ca.ca.delete_entry("a1", "admin:test").await.unwrap();
        let up = next(&mut a_stream).await;
        assert!(up.upserts.is_empty());
        assert_eq!(up.deleted_ids, ["a1"]);

        // Moved from A to B: a delete for A, an upsert for B.
        spec.parent_id = b.id.clone();
        ca.ca.update_entry(&spec, 0, "admin:test").await.unwrap();
        let up = next(&mut a_stream).await;
        assert!(up.upserts.is_empty());
        assert_eq!(up.deleted_ids, ["a3"]);
        let up = next(&mut b_stream).await;
        assert_eq!(ids(&up), ["a3"]);
        assert_eq!(up.upserts[0].parent_id, b.id);

        // Bundle changes are pushed with the bundle.
        ca.ca.publish(CaEvent::BundleChanged);
        let up = next(&mut a_stream).await;
        assert!(up.upserts.is_empty() && up.deleted_ids.is_empty());
        assert!(up.bundle.is_some());

        // A burst: whatever is pending when the stream wakes goes out in one update (merging
        // is unit-tested in node/tests.rs); nothing is lost and nothing is sent twice.
        let mut seen = Vec::new();
        for i in 0..20 {
            ca.entry(&format!("burst{i:02}"), &a.id).await;
        }
        while seen.len() < 20 {
            let up = next(&mut a_stream).await;
            seen.extend(up.upserts.iter().map(|e| e.id.clone()));
        }
        let expected: Vec<String> = (0..20).map(|i| format!("burst{i:02}")).collect();
        assert_eq!(seen, expected);
        quiet(&mut a_stream).await;

        // Shutdown ends open streams and is not held up by them.
        ca.stop().await;
        let end = tokio::time::timeout(Duration::from_secs(5), a_stream.message())
            .await
            .expect("stream not ended at shutdown");
        assert!(!matches!(end, Ok(Some(_))), "{end:?}");
    })
    .await
}

// One thread: the events below are published without a pause, so the sync loop cannot drain
// them as they come (on two threads it sometimes kept up, and nothing lagged).
#[tokio::test(flavor = "current_thread")]
async fn lagging_stream_gets_the_full_state_again() {
    bounded(async {
        let ca = TestCa::start().await;
        let mut a = ca.agent().await;
        let mut stream = a.sync().await;
        assert!(next(&mut stream).await.full);
        // Far more events than the channel holds, faster than the stream can take them.
        for _ in 0..(meshid_ca::service::EVENT_CAPACITY * 3) {
            ca.ca.publish(CaEvent::BundleChanged);
        }
        ca.entry("late", &a.id).await;
        let mut got_full = false;
        loop {
            let up = next(&mut stream).await;
            got_full |= up.full;
            if ids(&up).contains(&"late") {
                break;
            }
        }
        assert!(got_full, "a lagged stream must resend the full state");
        ca.stop().await;
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batch_sign_and_jwt_only_for_own_entries() {
    bounded(async {
        let ca = TestCa::start().await;
        let mut a = ca.agent().await;
        let b = ca.agent().await;
        ca.entry("mine", &a.id).await;
        ca.entry("theirs", &b.id).await;

        let good = csr().0;
        let garbage = b"\x30\x03garbage-csr-bytes".to_vec();
        let requests = vec![
            node::SignRequest {
                entry_id: "mine".into(),
                csr: good.clone(),
            },
            node::SignRequest {
                entry_id: "theirs".into(),
                csr: good.clone(),
            },
            node::SignRequest {
                entry_id: "nonexistent".into(),
                csr: good.clone(),
            },
            node::SignRequest {
                entry_id: "mine".into(),
                csr: garbage.clone(),
            },
        ];
        let results = a
            .client
            .batch_sign_x509(node::BatchSignX509Request { requests })
            .await
            .unwrap()
            .into_inner()
            .results;
        assert_eq!(results.len(), 4);
        let ids: Vec<&str> = results.iter().map(|r| r.entry_id.as_str()).collect();
        assert_eq!(ids, ["mine", "theirs", "nonexistent", "mine"]);
        assert!(results[0].error.is_empty(), "{:?}", results[0].error);
        assert_eq!(
            verify_chain(&results[0].chain, &ca.roots()),
            "spiffe://example.org/workload/mine"
        );
        assert!(!results[0].serial.is_empty());
        for r in &results[1..3] {
            assert!(r.chain.is_empty());
            assert!(r.error.contains("no entry"), "{}", r.error);
        }
        assert_eq!(
            results[1].error.replace("theirs", "X"),
            results[2].error.replace("nonexistent", "X"),
            "another agent's entry looks like a missing one"
        );
        assert!(results[3].chain.is_empty());
        assert!(results[3].error.contains("CSR"), "{}", results[3].error);
        assert!(!results[3].error.contains("garbage-csr-bytes"));
        // The issuance is in the audit log (one transaction per batch), with its serial, entry
        // and caller; the refused requests are not.
        let issued: Vec<_> = ca
            .ca
            .store
            .audit_records(0, 10_000)
            .await
            .unwrap()
            .into_iter()
            .filter(|r| r.kind == "svid.x509.issued")
            .collect();
        assert_eq!(issued.len(), 1, "{issued:?}");
        assert!(issued[0].details.contains(&results[0].serial), "{issued:?}");
        assert!(
            issued[0].details.contains("\"entry_id\":\"mine\""),
            "{issued:?}"
        );
        assert_eq!(issued[0].actor, a.id);
        meshid_ca::store::verify_audit(ca.ca.store.as_ref())
            .await
            .unwrap();
        // ...but they are counted: the next `audit.summary` record names the caller and why
        // (the forged entry id), without the CSR.
        let summary = loop {
            let found = ca
                .ca
                .store
                .audit_records(0, 10_000)
                .await
                .unwrap()
                .into_iter()
                .find(|r| r.kind == "audit.summary");
            if let Some(r) = found {
                break r;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        let details: serde_json::Value = serde_json::from_str(&summary.details).unwrap();
        let refused = &details["node_refused"];
        assert_eq!(refused["total"], 3, "{details}");
        let by = refused["by"].as_array().unwrap();
        assert!(by.iter().all(|r| r["actor"] == a.id.as_str()), "{details}");
        assert!(
            by.iter()
                .any(|r| r["what"].as_str().unwrap().contains("theirs")),
            "{details}"
        );
        assert!(!summary.details.contains("garbage-csr-bytes"));

        // The batch limit.
        let requests = vec![
            node::SignRequest {
                entry_id: "mine".into(),
                csr: good.clone(),
            };
            501
        ];
        let status = a
            .client
            .batch_sign_x509(node::BatchSignX509Request { requests })
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");

        // JWT-SVIDs.
        let jwt = a
            .client
            .mint_jwt_svid(node::MintJwtSvidRequest {
                entry_id: "mine".into(),
                audience: vec!["db".into()],
            })
            .await
            .unwrap()
            .into_inner();
        let payload = jwt.token.split('.').nth(1).unwrap();
        let claims: serde_json::Value = serde_json::from_slice(
            &base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(payload)
                .unwrap(),
        )
        .unwrap();
        assert_eq!(claims["sub"], "spiffe://example.org/workload/mine");
        assert_eq!(claims["exp"], jwt.expires_at);
        let status = a
            .client
            .mint_jwt_svid(node::MintJwtSvidRequest {
                entry_id: "theirs".into(),
                audience: vec!["db".into()],
            })
            .await
            .unwrap_err();
        assert_denied(status, "no entry");
        ca.stop().await;
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn renew_agent_issues_a_new_svid() {
    bounded(async {
        let ca = TestCa::start().await;
        let mut a = ca.agent().await;
        let (csr, key) = csr();
        let renewed = a
            .client
            .renew_agent(node::RenewAgentRequest { csr })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(renewed.spiffe_id, a.id);
        assert_eq!(verify_chain(&renewed.chain, &ca.roots()), a.id);
        assert_ne!(renewed.chain[0], a.svid.chain[0]);
        let record = ca
            .ca
            .store
            .get_agent(&SpiffeId::new(&a.id).unwrap())
            .await
            .unwrap()
            .unwrap();
        let (_, leaf) = x509_parser::parse_x509_certificate(&renewed.chain[0]).unwrap();
        assert_eq!(record.serial, hex::encode(leaf.raw_serial()));
        assert_eq!(record.expires_at, renewed.expires_at);
        // The renewed SVID works on a new connection.
        let mut again = ca.connect_agent(renewed, key).await;
        let mut stream = again.sync().await;
        assert!(next(&mut stream).await.full);
        ca.stop().await;
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn evicted_agent_is_cut_off_and_may_attest_again() {
    bounded(async {
        let ca = TestCa::start().await;
        let mut a = ca.agent().await;
        let other = ca.agent().await;
        ca.entry("e", &a.id).await;
        let mut stream = a.sync().await;
        assert!(next(&mut stream).await.full);

        // The operator CLI lists and shows agents.
        let list: serde_json::Value =
            serde_json::from_str(&ca.cli(&["agent", "list", "--output", "json"])).unwrap();
        let listed: Vec<&str> = list
            .as_array()
            .unwrap()
            .iter()
            .map(|a| a["spiffe_id"].as_str().unwrap())
            .collect();
        let mut expected = vec![a.id.as_str(), other.id.as_str()];
        expected.sort();
        assert_eq!(listed, expected);
        let shown: serde_json::Value =
            serde_json::from_str(&ca.cli(&["agent", "show", &a.id, "--output", "json"])).unwrap();
        assert_eq!(shown["attestation_type"], "join_token");
        assert_eq!(shown["banned"], false);
        assert!(ca.cli(&["agent", "list"]).contains("Found 2 agents"));

        assert!(ca.cli(&["agent", "evict", &a.id]).contains("Evicted"));
        // The open stream ends with PermissionDenied.
        let end = tokio::time::timeout(PUSH, stream.message())
            .await
            .expect("stream not ended on eviction");
        assert_denied(end.unwrap_err(), "evicted or banned");
        // Every later call is refused.
        assert_denied(
            a.client.sync(node::SyncRequest {}).await.err().unwrap(),
            "is not attested",
        );
        let status = a
            .client
            .batch_sign_x509(node::BatchSignX509Request {
                requests: vec![node::SignRequest {
                    entry_id: "e".into(),
                    csr: csr().0,
                }],
            })
            .await
            .unwrap_err();
        assert_denied(status, "is not attested");
        assert_denied(
            a.client
                .renew_agent(node::RenewAgentRequest { csr: csr().0 })
                .await
                .unwrap_err(),
            "is not attested",
        );
        let list: serde_json::Value =
            serde_json::from_str(&ca.cli(&["agent", "list", "--output", "json"])).unwrap();
        assert_eq!(list.as_array().unwrap().len(), 1);
        // It may attest again with a new token (a new agent ID).
        let again = ca.agent().await;
        assert_ne!(again.id, a.id);
        ca.stop().await;
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn banned_agent_is_refused_and_cannot_attest_again() {
    bounded(async {
        let ca = TestCa::start().await;
        let mut a = ca.agent().await;
        let mut stream = a.sync().await;
        assert!(next(&mut stream).await.full);
        assert!(ca.cli(&["agent", "ban", &a.id]).contains("Banned"));
        let end = tokio::time::timeout(PUSH, stream.message())
            .await
            .expect("stream not ended on ban");
        assert_denied(end.unwrap_err(), "evicted or banned");
        assert_denied(
            a.client
                .renew_agent(node::RenewAgentRequest { csr: csr().0 })
                .await
                .unwrap_err(),
            "is banned",
        );
        let shown: serde_json::Value =
            serde_json::from_str(&ca.cli(&["agent", "show", &a.id, "--output", "json"])).unwrap();
        assert_eq!(shown["banned"], true);

        // Attesting as a banned ID is refused: ban the ID a fresh token will produce.
        let token = ca.ca.generate_token(0, "admin:test").await.unwrap();
        let id = format!(
            "spiffe://example.org/meshid/agent/join_token/{}",
            token.record.id
        );
        ca.ca
            .store
            .upsert_agent(
                &AgentRecord {
                    spiffe_id: SpiffeId::new(&id).unwrap(),
                    attestation_type: "join_token".into(),
                    serial: "00".into(),
                    expires_at: 0,
                    created_at: 0,
                    banned: true,
                    previous_serial: String::new(),
                    previous_until: 0,
                },
                &meshid_ca::audit::AuditEvent::new("agent.banned", "test", serde_json::json!({})),
            )
            .await
            .unwrap();
        let status = ca
            .anonymous()
            .await
            .attest_join_token(node::AttestJoinTokenRequest {
                token: token.secret().to_owned(),
                csr: csr().0,
            })
            .await
            .unwrap_err();
        assert_denied(status, "is banned");
        assert!(
            ca.ca
                .store
                .get_agent(&SpiffeId::new(&id).unwrap())
                .await
                .unwrap()
                .unwrap()
                .banned
        );
        ca.stop().await;
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sync_stream_ends_when_the_agent_svid_expires() {
    bounded(async {
        let ca = TestCa::start_with(|raw| {
            raw.ca.default_x509_svid_ttl = Some("4s".into());
        })
        .await;
        let mut a = ca.agent().await;
        let mut stream = a.sync().await;
        assert!(next(&mut stream).await.full);
        let end = tokio::time::timeout(Duration::from_secs(8), stream.message())
            .await
            .expect("stream outlived the SVID");
        let status = end.unwrap_err();
        assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
        ca.stop().await;
    })
    .await
}

/// Two CA servers on one PostgreSQL database: an agent connected to server B sees, on its open
/// Sync stream, the entry changes an operator makes through server A (replayed from the shared
/// audit log), and an eviction made on A ends its stream on B.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changes_made_on_another_server_reach_this_servers_agents() {
    let Some(db) = pg::fresh_database().await else {
        return;
    };
    bounded(async {
        let url = db.url.clone();
        let a = TestCa::start_with(|raw| {
            raw.datastore = Some(url.clone());
            raw.server_id = Some("ca-a".into());
        })
        .await;
        let url = db.url.clone();
        let b = TestCa::start_with(|raw| {
            raw.datastore = Some(url.clone());
            raw.server_id = Some("ca-b".into());
        })
        .await;
        let mut agent = b.agent().await;
        let mut stream = agent.sync().await;
        assert!(next(&mut stream).await.full);

        // Created, updated, moved away and deleted through A.
        a.entry("x1", &agent.id).await;
        let up = tokio::time::timeout(PUSH, stream.message())
            .await
            .expect("pushed from A within 1 s")
            .unwrap()
            .unwrap();
        assert_eq!(ids(&up), ["x1"]);
        let mut spec = EntrySpec::from(
            &a.ca
                .store
                .get_entry(&"x1".parse().unwrap())
                .await
                .unwrap()
                .unwrap(),
        );
        spec.selectors = vec!["unix:uid:3000".into()];
        a.ca.update_entry(&spec, 0, "admin:test").await.unwrap();
        let up = next(&mut stream).await;
        assert_eq!(up.upserts[0].selectors, ["unix:uid:3000"]);
        spec.parent_id = "spiffe://example.org/meshid/agent/elsewhere".into();
        a.ca.update_entry(&spec, 0, "admin:test").await.unwrap();
        let up = next(&mut stream).await;
        assert_eq!(up.deleted_ids, ["x1"]);
        a.entry("x2", &agent.id).await;
        assert_eq!(ids(&next(&mut stream).await), ["x2"]);
        // Rotated through A: B's agent gets the next revision.
        let rotated = a.ca.rotate_entry("x2", "test", "admin:test").await.unwrap();
        let up = next(&mut stream).await;
        assert_eq!(ids(&up), ["x2"]);
        assert_eq!(up.upserts[0].revision, rotated.revision);
        a.ca.delete_entry("x2", "admin:test").await.unwrap();
        assert_eq!(next(&mut stream).await.deleted_ids, ["x2"]);

        // Evicted through A: the stream on B ends.
        a.ca.evict_agent(&agent.id, "admin:test").await.unwrap();
        let end = tokio::time::timeout(Duration::from_secs(5), stream.message())
            .await
            .expect("stream ended after eviction on A");
        assert!(!matches!(end, Ok(Some(_))), "{end:?}");
        let _ = &mut agent;
        a.stop().await;
        b.stop().await;
    })
    .await;
    drop(db);
}

/// Issue 10, item 8: agent and server SVIDs carry meshid's role marks and both ends check
/// them. A workload SVID that names an attested agent's ID (signed with the CA's key, as a
/// stolen key or an ID minted before `/meshid/` was reserved would be) is refused by the node
/// API; one that names the server's ID is refused as the CA by the client agents use.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn role_marks_tell_agents_and_the_server_from_workloads() {
    use meshid_api::role::Role;
    bounded(async {
        let ca = TestCa::start().await;
        let a = ca.agent().await;
        let leaf = &a.svid.chain[0];
        assert!(Role::Agent.marks(leaf) && !Role::Server.marks(leaf));
        let (csr_der, _) = csr();
        let workload = ca
            .ca
            .mint_x509(
                "spiffe://example.org/workload/w",
                &csr_der,
                0,
                &[],
                "admin:test",
            )
            .await
            .unwrap();
        assert!(!Role::Agent.marks(&workload.chain[0]) && !Role::Server.marks(&workload.chain[0]));
        // The marked agent SVID passes openssl's strict verification.
        let dir = tempfile::tempdir().unwrap();
        let pem = |ders: &[Vec<u8>]| -> String {
            ders.iter()
                .map(|d| {
                    use base64::Engine as _;
                    let b = base64::engine::general_purpose::STANDARD.encode(d);
                    let lines: Vec<&str> = b
                        .as_bytes()
                        .chunks(64)
                        .map(|c| std::str::from_utf8(c).unwrap())
                        .collect();
                    format!(
                        "-----BEGIN CERTIFICATE-----\n{}\n-----END CERTIFICATE-----\n",
                        lines.join("\n")
                    )
                })
                .collect()
        };
        let roots: Vec<Vec<u8>> = ca.roots().iter().map(|r| r.to_vec()).collect();
        std::fs::write(dir.path().join("leaf.pem"), pem(&a.svid.chain[..1])).unwrap();
        std::fs::write(dir.path().join("chain.pem"), pem(&a.svid.chain[1..])).unwrap();
        std::fs::write(dir.path().join("roots.pem"), pem(&roots)).unwrap();
        let out = std::process::Command::new("openssl")
            .args([
                "verify",
                "-x509_strict",
                "-CAfile",
                "roots.pem",
                "-untrusted",
                "chain.pem",
                "leaf.pem",
            ])
            .current_dir(dir.path())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );

        // The node API: the attested agent's own ID, unmarked, under another key.
        let (csr_der, key) = csr();
        let forged = ca
            .ca
            .authority
            .sign_x509_svid(&csr_der, &spiffe::SpiffeId::new(&a.id).unwrap(), &[], None)
            .unwrap();
        let mut client =
            NodeClient::new(ca.channel(Some((forged.chain.clone(), key))).await.unwrap());
        let status = client.sync(node::SyncRequest {}).await.err().unwrap();
        assert_eq!(status.code(), tonic::Code::PermissionDenied, "{status:?}");

        // The client: a server presenting an unmarked SVID for the server's ID.
        let (csr_der, key) = csr();
        let server_id = spiffe::SpiffeId::new(SERVER_ID).unwrap();
        let fake = ca
            .ca
            .authority
            .sign_x509_svid(&csr_der, &server_id, &[], None)
            .unwrap();
        let config = rustls::ServerConfig::builder_with_provider(std::sync::Arc::new(
            rustls::crypto::aws_lc_rs::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(fake.chain.clone(), key)
        .unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let acceptor = tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(config));
        let server = tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let _ = acceptor.accept(tcp).await;
            }
        });
        let client_config = tls::client_config(
            ca.roots(),
            ExpectedId::Exact(SpiffeId::new(SERVER_ID).unwrap()),
            None,
        )
        .unwrap();
        let err = tls::connect(&addr, Arc::new(client_config))
            .await
            .unwrap_err();
        let mut chain = err.to_string();
        let mut source = std::error::Error::source(&err);
        while let Some(e) = source {
            chain = format!("{chain}: {e}");
            source = e.source();
        }
        assert!(chain.contains("without the CA server mark"), "{chain}");
        server.abort();
        // The real CA server's SVID is marked, and the same client connects to it.
        assert!(ca.channel(None).await.is_ok());
        ca.stop().await;
    })
    .await
}

/// Presents a chain and key as they are (rustls' own constructors would refuse a key that
/// does not match the leaf, and the corpus has one).
#[derive(Debug)]
struct Present(Arc<rustls::sign::CertifiedKey>);

impl rustls::client::ResolvesClientCert for Present {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[rustls::SignatureScheme],
    ) -> Option<Arc<rustls::sign::CertifiedKey>> {
        Some(Arc::clone(&self.0))
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// The malformed-SVID corpus (`ca/api/tests/testdata/svid/`, checked by the verifier's own test)
/// against the node API of a CA whose root is the corpus root: an agent presenting any corpus
/// SVID is refused, and every one but the well-formed control is refused in the TLS handshake,
/// by the same verifier the proxy uses, before any call runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_presenting_any_corpus_svid_are_refused() {
    use rustls_pki_types::pem::PemObject as _;
    bounded(async {
        let corpus =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("api/tests/testdata/svid");
        let keys = tempfile::tempdir().unwrap();
        for name in ["root.crt.pem", "root.key.pem"] {
            let to = keys.path().join(name);
            std::fs::copy(corpus.join(name), &to).unwrap();
            std::fs::set_permissions(&to, std::os::unix::fs::PermissionsExt::from_mode(0o600))
                .unwrap();
        }
        let ca = TestCa::start_with(|raw| {
            raw.ca.upstream_cert = Some(keys.path().join("root.crt.pem"));
            raw.ca.upstream_key = Some(keys.path().join("root.key.pem"));
        })
        .await;
        let root = CertificateDer::from_pem_file(corpus.join("root.crt.pem")).unwrap();
        assert_eq!(ca.roots(), vec![root], "the CA runs under the corpus root");

        let mut files: Vec<_> = std::fs::read_dir(&corpus)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .filter(|n| n.ends_with(".pem") && !n.contains("root."))
            .collect();
        files.sort();
        assert!(files.len() >= 15, "corpus: {files:?}");
        for file in files {
            let pem = std::fs::read(corpus.join(&file)).unwrap();
            let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&pem)
                .collect::<Result<_, _>>()
                .unwrap();
            let key = PrivateKeyDer::from_pem_slice(&pem).unwrap();
            let signing = tls::provider().key_provider.load_private_key(key).unwrap();
            let verifier = tls::server_verifier(
                Arc::new(tls::SvidVerifier::with_bundles(
                    tls::PeerBundles::from_roots([(
                        spiffe::TrustDomain::new("example.org").unwrap(),
                        ca.roots(),
                    )])
                    .unwrap(),
                )),
                ExpectedId::Exact(SpiffeId::new(SERVER_ID).unwrap()),
            );
            let mut config = rustls::ClientConfig::builder_with_provider(tls::provider())
                .with_protocol_versions(tls::PROTOCOL_VERSIONS)
                .unwrap()
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(verifier))
                .with_client_cert_resolver(Arc::new(Present(Arc::new(
                    rustls::sign::CertifiedKey::new(chain, signing),
                ))));
            config.alpn_protocols = vec![tls::ALPN_H2.to_vec()];
            let refused_before = ca.ca.metrics.node_handshake_failures.get();
            // With TLS 1.3 the client finishes before the server has judged its certificate:
            // the refusal shows on the first call (or already on connect).
            let outcome = match tls::connect(&ca.node.to_string(), Arc::new(config)).await {
                Err(e) => Err(e.to_string()),
                Ok(channel) => NodeClient::new(channel)
                    .renew_agent(node::RenewAgentRequest { csr: csr().0 })
                    .await
                    .map(|_| ())
                    .map_err(|s| format!("{:?}: {}", s.code(), s.message())),
            };
            // The server counts the refusal in its connection task, maybe after the client saw it.
            let mut refused_in_handshake = 0;
            for _ in 0..50 {
                refused_in_handshake = ca.ca.metrics.node_handshake_failures.get() - refused_before;
                if refused_in_handshake > 0 || file == "valid.pem" {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            if file == "valid.pem" {
                // Well-formed, so the handshake completes; but it names no agent.
                let err = outcome.expect_err("valid.pem: a workload SVID must not renew an agent");
                assert!(err.contains("is not an agent identity"), "valid.pem: {err}");
                assert_eq!(refused_in_handshake, 0, "valid.pem");
            } else {
                let err = outcome.expect_err(&file);
                assert!(
                    !err.starts_with("PermissionDenied"),
                    "{file}: reached a call: {err}"
                );
                assert!(refused_in_handshake >= 1, "{file}: {err}");
            }
        }
        ca.stop().await;
    })
    .await;
}

/// `meshid-ca entry rotate`: the entry's agent gets it again with the next revision (which
/// makes it sign a new SVID), other agents hear nothing, and the audit log says who and why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn entry_rotate_reissues_the_entry_at_its_agent_only() {
    bounded(async {
        let ca = TestCa::start().await;
        let mut a = ca.agent().await;
        let mut b = ca.agent().await;
        let before = ca.entry("r1", &a.id).await;
        ca.entry("b1", &b.id).await;
        let mut a_stream = a.sync().await;
        assert_eq!(ids(&next(&mut a_stream).await), ["r1"]);
        let mut b_stream = b.sync().await;
        assert_eq!(ids(&next(&mut b_stream).await), ["b1"]);

        let out = ca.cli(&[
            "entry",
            "rotate",
            "r1",
            "--reason",
            "key copied to a laptop",
        ]);
        assert!(out.contains("revision 2"), "{out}");
        let up = next(&mut a_stream).await;
        assert!(!up.full);
        assert_eq!(ids(&up), ["r1"]);
        assert_eq!(up.upserts[0].revision, before.revision + 1);
        // Nothing else about the entry changed.
        assert_eq!(up.upserts[0].spiffe_id, before.spiffe_id.to_string());
        assert_eq!(up.upserts[0].selectors, ["unix:uid:1000"]);
        quiet(&mut b_stream).await;

        let audit = ca.ca.store.audit_records(0, 1000).await.unwrap();
        let rotated: Vec<_> = audit.iter().filter(|r| r.kind == "entry.rotated").collect();
        assert_eq!(rotated.len(), 1);
        let details: serde_json::Value = serde_json::from_str(&rotated[0].details).unwrap();
        assert_eq!(details["entry_id"], "r1");
        assert_eq!(details["reason"], "key copied to a laptop");
        assert_eq!(details["revision"], 2);
        assert!(
            rotated[0].actor.starts_with("admin:"),
            "{}",
            rotated[0].actor
        );

        // Refused, with nothing recorded: an unknown entry, a reason with a control character.
        let err = ca
            .ca
            .rotate_entry("nope", "", "admin:test")
            .await
            .unwrap_err();
        assert!(err.to_string().contains("not found"), "{err}");
        let err = ca
            .ca
            .rotate_entry("r1", "two\nlines", "admin:test")
            .await
            .unwrap_err();
        assert!(err.to_string().contains("control character"), "{err}");
        let audit = ca.ca.store.audit_records(0, 1000).await.unwrap();
        assert_eq!(
            audit.iter().filter(|r| r.kind == "entry.rotated").count(),
            1
        );
        quiet(&mut a_stream).await;
        ca.stop().await;
    })
    .await
}

/// `meshid-ca agent rotate`: every entry of the agent moves to its next revision, the agent is
/// told to renew its own SVID, other agents hear nothing, and it is all audited.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_rotate_reissues_all_its_entries_and_asks_it_to_renew() {
    bounded(async {
        let ca = TestCa::start().await;
        let mut a = ca.agent().await;
        let mut b = ca.agent().await;
        ca.entry("a1", &a.id).await;
        ca.entry("a2", &a.id).await;
        ca.entry("b1", &b.id).await;
        let mut a_stream = a.sync().await;
        assert_eq!(ids(&next(&mut a_stream).await), ["a1", "a2"]);
        let mut b_stream = b.sync().await;
        assert_eq!(ids(&next(&mut b_stream).await), ["b1"]);

        let out = ca.cli(&["agent", "rotate", &a.id, "--reason", "node reimaged"]);
        assert!(out.contains("2 entries"), "{out}");
        // The changes may come in one update or several: gather until all are seen.
        let mut revisions = std::collections::BTreeMap::new();
        let mut renew = false;
        while revisions.len() < 2 || !renew {
            let up = next(&mut a_stream).await;
            assert!(!up.full);
            renew |= up.renew_agent_svid;
            for e in up.upserts {
                revisions.insert(e.id.clone(), e.revision);
            }
        }
        assert_eq!(
            revisions,
            [("a1".to_owned(), 2), ("a2".to_owned(), 2)].into()
        );
        quiet(&mut b_stream).await;

        let audit = ca.ca.store.audit_records(0, 1000).await.unwrap();
        let details = |kind: &str| -> Vec<serde_json::Value> {
            audit
                .iter()
                .filter(|r| r.kind == kind)
                .map(|r| serde_json::from_str(&r.details).unwrap())
                .collect()
        };
        let rotated = details("agent.rotated");
        assert_eq!(rotated.len(), 1);
        assert_eq!(rotated[0]["spiffe_id"], a.id.as_str());
        assert_eq!(rotated[0]["entries"], 2);
        assert_eq!(rotated[0]["reason"], "node reimaged");
        let entries = details("entry.rotated");
        assert_eq!(entries.len(), 2);
        assert!(entries
            .iter()
            .all(|e| e["reason"] == "agent rotate: node reimaged"));

        // The renewal it asks for works, on the connection it has.
        let (csr, _key) = csr();
        let renewed = a
            .client
            .renew_agent(node::RenewAgentRequest { csr })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(renewed.spiffe_id, a.id);

        // Refused: an unknown agent, a banned one.
        let err = ca
            .ca
            .rotate_agent(
                "spiffe://example.org/meshid/agent/join_token/nope",
                "",
                "admin:test",
            )
            .await
            .unwrap_err();
        assert!(err.to_string().contains("not found"), "{err}");
        ca.ca.ban_agent(&b.id, "admin:test").await.unwrap();
        let err = ca
            .ca
            .rotate_agent(&b.id, "", "admin:test")
            .await
            .unwrap_err();
        assert!(err.to_string().contains("banned"), "{err}");
        ca.stop().await;
    })
    .await
}

/// `ReportDelivery`: what an agent says its workloads' streams have is kept per agent and per
/// server, shown by `agent list`/`agent show`, counted by `ca status`, and exported as each
/// agent's lag behind the current bundle.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delivery_reports_are_kept_and_shown() {
    bounded(async {
        let ca = TestCa::start().await;
        let mut a = ca.agent().await;
        let b = ca.agent().await;
        let current = ca.ca.authority.bundle().sequence;
        let status = || -> serde_json::Value {
            serde_json::from_str(&ca.cli(&["ca", "status", "--output", "json"])).unwrap()
        };
        let s = status();
        assert_eq!(s["bundle_sequence"], current);
        assert_eq!(
            (s["agents_delivered"].as_u64(), s["agents_live"].as_u64()),
            (Some(0), Some(2))
        );

        // A behind, then current.
        a.client
            .report_delivery(node::DeliveryReport {
                bundle_sequence: current - 1,
                x509_streams: 3,
                crl_digest: String::new(),
                policy_revision: 0,
            })
            .await
            .unwrap();
        assert_eq!(
            ca.ca.delivery_lags(),
            vec![(SpiffeId::new(&a.id).unwrap(), 1)]
        );
        assert_eq!(status()["agents_delivered"], 0);
        // A CRL digest that is not one is refused, and nothing is recorded.
        for bad in ["NOT-HEX", &"a".repeat(65)] {
            let err = a
                .client
                .report_delivery(node::DeliveryReport {
                    bundle_sequence: current,
                    x509_streams: 2,
                    crl_digest: bad.to_owned(),
                    policy_revision: 0,
                })
                .await
                .unwrap_err();
            assert_eq!(err.code(), Code::InvalidArgument, "{bad}");
            assert!(err.message().contains("crl_digest"), "{err:?}");
        }
        let digest = meshid_api::tls::revocation::set_digest(&[]);
        a.client
            .report_delivery(node::DeliveryReport {
                bundle_sequence: current,
                x509_streams: 2,
                crl_digest: digest.clone(),
                policy_revision: 7,
            })
            .await
            .unwrap();
        let shown: serde_json::Value =
            serde_json::from_str(&ca.cli(&["agent", "show", &a.id, "--output", "json"])).unwrap();
        assert_eq!(shown["delivered_bundle_sequence"], current);
        assert_eq!(shown["x509_streams"], 2);
        assert_eq!(shown["delivery_server_id"], ca.ca.authority.server_id());
        assert_eq!(shown["policy_revision"], 7);
        assert!(ca
            .cli(&["agent", "show", &b.id])
            .contains("Bundle delivered : never reported"));
        assert_eq!(status()["agents_delivered"], 1);
        let text = ca.cli(&["ca", "status"]);
        assert!(text.contains("delivered by 1 of 2 live agents"), "{text}");
        let stored = ca.ca.store.list_deliveries().await.unwrap();
        assert_eq!(stored.len(), 1);
        assert_eq!(stored[0].bundle_sequence, current);
        assert_eq!(stored[0].crl_digest, digest);
        assert_eq!(
            ca.ca.delivery_lags(),
            vec![(SpiffeId::new(&a.id).unwrap(), 0)]
        );
        let ops = meshid_api::ops::Ops::metrics(&server::ops(ca.ca.clone())).unwrap();
        assert!(
            ops.contains(&format!(
                "meshid_ca_agent_bundle_lag{{agent=\"{}\"}} 0",
                a.id
            )),
            "{ops}"
        );

        // Without an agent SVID, nothing is taken.
        let err = ca
            .anonymous()
            .await
            .report_delivery(node::DeliveryReport {
                bundle_sequence: current,
                x509_streams: 0,
                crl_digest: String::new(),
                policy_revision: 0,
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::PermissionDenied);
        ca.stop().await;
    })
    .await
}

/// `ReportDenials`: an agent speaks only for its own entries (other callees are dropped), a
/// malformed count refuses the whole report, the recorded time is clamped to the last hour,
/// and an agent reporting faster than once a second is told to slow down (each report is an
/// audit write).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn denial_reports_are_checked_clamped_and_rate_limited() {
    bounded(async {
        let ca = TestCa::start().await;
        let mut a = ca.agent().await;
        let b = ca.agent().await;
        let mine = ca.entry("mine", &a.id).await.spiffe_id.to_string();
        let theirs = ca.entry("theirs", &b.id).await.spiffe_id.to_string();
        let count = |callee: &str, rule: &str, last_at: i64| node::NodeDenialCount {
            caller: "spiffe://example.org/web".into(),
            callee: callee.into(),
            rule: rule.into(),
            count: 2,
            last_at,
        };
        let now = meshid_ca::unix_now();
        a.client
            .report_denials(node::NodeDenialReport {
                denials: vec![
                    count(&mine, "no-admin", now + 86_400),
                    count(&theirs, "r", now),
                ],
            })
            .await
            .unwrap();
        let records = ca
            .ca
            .store
            .audit_records(0, 10_000)
            .await
            .unwrap()
            .into_iter()
            .filter(|r| r.kind == "denials.reported")
            .collect::<Vec<_>>();
        assert_eq!(records.len(), 1);
        assert_eq!(records[0].actor, a.id);
        let details: serde_json::Value = serde_json::from_str(&records[0].details).unwrap();
        let denials = details["denials"].as_array().unwrap();
        assert_eq!(
            denials.len(),
            1,
            "the other agent's workload is dropped: {details}"
        );
        assert_eq!(denials[0]["callee"], mine.as_str());
        let at = denials[0]["last_at"].as_i64().unwrap();
        assert!(
            (now..=now + 5).contains(&at),
            "a future time is clamped to now: {at}"
        );

        // A malformed count refuses the report whole.
        tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
        let err = a
            .client
            .report_denials(node::NodeDenialReport {
                denials: vec![
                    count(&mine, "ok", now),
                    count(&mine, "bad\u{202e}rule", now),
                ],
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err}");

        // Faster than once a second (a burst of two allowed): slowed down.
        let mut codes = Vec::new();
        for _ in 0..4 {
            let r = a
                .client
                .report_denials(node::NodeDenialReport {
                    denials: vec![count(&mine, "no-admin", now)],
                })
                .await;
            codes.push(r.map_or_else(|s| s.code(), |_| tonic::Code::Ok));
        }
        assert!(
            codes.contains(&tonic::Code::ResourceExhausted),
            "four reports at once: {codes:?}"
        );
        ca.stop().await;
    })
    .await
}
