//! The agent's Workload API server, spoken to by the unmodified `spiffe` crate client (as any
//! workload would) and by a raw generated client for the wire details the library hides.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::HashMap;
use std::future::Future;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::signature::{EcdsaKeyPair, KeyPair as _, ECDSA_P256_SHA256_FIXED_SIGNING};
use base64::Engine as _;
use futures::StreamExt as _;
use meshid_agent::attest::Attestor;
use meshid_agent::cache::{Bundle, Entry, Identity, JwtMinter, MintError, Snapshot, Svid};
use meshid_agent::service::{ServeError, WorkloadApi};
use meshid_api::workload::spiffe_workload_api_client::SpiffeWorkloadApiClient;
use meshid_api::workload::{JwtsvidRequest, ValidateJwtsvidRequest, X509svidRequest};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType, SerialNumber,
};
use spiffe::{SpiffeId, TrustDomain, WorkloadApiClient, WorkloadApiError, X509Source};
use tokio::net::UnixListener;
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;
use zeroize::Zeroizing;

const TD: &str = "example.org";
const TEST_ID: &str = "spiffe://example.org/test";
const JWT_KID: &str = "jwt-key-1";
/// Every test finishes within this, or fails.
const TEST_TIMEOUT: Duration = Duration::from_secs(60);
/// How long to watch a stream for a message that must not come.
const QUIET: Duration = Duration::from_millis(500);

/// Runs a test body under [`TEST_TIMEOUT`].
async fn bounded<F: Future<Output = ()>>(body: F) {
    tokio::time::timeout(TEST_TIMEOUT, body)
        .await
        .expect("test timed out");
}

/// The effective uid and gid of this process (`/proc/self` is owned by them).
fn own_ids() -> (u32, u32) {
    let meta = std::fs::metadata("/proc/self").unwrap();
    (meta.uid(), meta.gid())
}

fn own_uid_selector() -> String {
    format!("unix:uid:{}", own_ids().0)
}

/// One attestor for all tests, so the test binary is hashed once.
fn attestor() -> Arc<Attestor> {
    static ATTESTOR: OnceLock<Arc<Attestor>> = OnceLock::new();
    Arc::clone(ATTESTOR.get_or_init(|| Arc::new(Attestor::new())))
}

// ---------------------------------------------------------------------------------------------
// Test PKI: a root CA and SPIFFE leaf SVIDs, minted with rcgen.

struct Pki {
    root_params: CertificateParams,
    root_key: KeyPair,
    root_der: Vec<u8>,
    serial: AtomicU64,
}

impl Pki {
    fn new() -> Self {
        let root_key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params
            .distinguished_name
            .push(DnType::CommonName, "test root");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        params.subject_alt_names = vec![SanType::URI(format!("spiffe://{TD}").try_into().unwrap())];
        let root_der = params.self_signed(&root_key).unwrap().der().to_vec();
        Self {
            root_params: params,
            root_key,
            root_der,
            serial: AtomicU64::new(1),
        }
    }

    /// A leaf X509-SVID for `id`: one URI SAN, CA:false, digitalSignature, one hour.
    fn svid(&self, id: &str) -> Svid {
        let key = KeyPair::generate().unwrap();
        let serial = self.serial.fetch_add(1, Ordering::Relaxed);
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.subject_alt_names = vec![SanType::URI(id.try_into().unwrap())];
        params.serial_number = Some(SerialNumber::from(serial));
        let now = time::OffsetDateTime::now_utc();
        params.not_before = now - time::Duration::minutes(1);
        params.not_after = now + time::Duration::hours(1);
        let issuer = Issuer::from_params(&self.root_params, &self.root_key);
        let cert = params.signed_by(&key, &issuer).unwrap();
        Svid {
            chain: vec![cert.der().to_vec()],
            key_pkcs8: Zeroizing::new(key.serialize_der()),
            serial: format!("{serial:x}"),
            not_before: params.not_before.unix_timestamp(),
            not_after: params.not_after.unix_timestamp(),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// A JWT minter standing in for the CA: signs real ES256 JWT-SVIDs.

struct FakeMinter {
    key: EcdsaKeyPair,
    rng: SystemRandom,
    /// entry id → SPIFFE ID.
    ids: Mutex<HashMap<String, String>>,
    mints: AtomicUsize,
    unavailable: std::sync::atomic::AtomicBool,
}

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
        .try_into()
        .unwrap()
}

impl FakeMinter {
    fn new() -> Self {
        let rng = SystemRandom::new();
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng).unwrap();
        let key =
            EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8.as_ref()).unwrap();
        Self {
            key,
            rng,
            ids: Mutex::new(HashMap::new()),
            mints: AtomicUsize::new(0),
            unavailable: false.into(),
        }
    }

    /// The JWKS of the signing key, as the CA publishes it (plus an X.509 key to filter out).
    fn jwks(&self, root_der: &[u8]) -> String {
        let point = self.key.public_key().as_ref();
        let (x, y) = point[1..].split_at(32);
        serde_json::json!({ "keys": [
            { "kty": "EC", "crv": "P-256", "x": b64(x), "y": b64(y), "kid": JWT_KID, "use": "jwt-svid" },
            { "kty": "EC", "use": "x509-svid",
              "x5c": [base64::engine::general_purpose::STANDARD.encode(root_der)] },
        ]})
        .to_string()
    }
}

#[tonic::async_trait]
impl JwtMinter for FakeMinter {
    async fn mint(&self, entry_id: &str, audience: &[String]) -> Result<(String, i64), MintError> {
        if self.unavailable.load(Ordering::Relaxed) {
            return Err(MintError::Unavailable("CA down".into()));
        }
        let sub = self
            .ids
            .lock()
            .unwrap()
            .get(entry_id)
            .cloned()
            .ok_or_else(|| MintError::Refused(format!("unknown entry {entry_id}")))?;
        self.mints.fetch_add(1, Ordering::Relaxed);
        let now = unix_now();
        let exp = now + 300;
        let header = serde_json::json!({ "alg": "ES256", "kid": JWT_KID, "typ": "JWT" });
        let claims = serde_json::json!({ "sub": sub, "aud": audience, "exp": exp, "iat": now });
        let signing_input = format!(
            "{}.{}",
            b64(header.to_string().as_bytes()),
            b64(claims.to_string().as_bytes())
        );
        let sig = self.key.sign(&self.rng, signing_input.as_bytes()).unwrap();
        Ok((format!("{signing_input}.{}", b64(sig.as_ref())), exp))
    }
}

// ---------------------------------------------------------------------------------------------
// Snapshots and the server under test.

fn entry(id: &str, spiffe_id: &str, selectors: &[&str], hint: &str) -> Entry {
    let mut selectors: Vec<String> = selectors.iter().map(|s| (*s).to_owned()).collect();
    selectors.sort();
    Entry {
        id: id.into(),
        spiffe_id: SpiffeId::new(spiffe_id).unwrap(),
        selectors,
        x509_svid_ttl: 0,
        jwt_svid_ttl: 0,
        dns_names: Vec::new(),
        federates_with: Vec::new(),
        hint: hint.into(),
        revision: 1,
    }
}

struct Agent {
    _dir: tempfile::TempDir,
    socket: PathBuf,
    pki: Pki,
    minter: Arc<FakeMinter>,
    bundle: Arc<Bundle>,
    tx: watch::Sender<Arc<Snapshot>>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<Result<(), ServeError>>>,
}

impl Agent {
    /// Serves an unsynced, empty snapshot; call [`Agent::publish`] next.
    async fn start() -> Self {
        Self::start_with(|api| api.with_ready_wait(Duration::from_secs(5))).await
    }

    async fn start_with(configure: impl FnOnce(WorkloadApi) -> WorkloadApi) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("agent.sock");
        let listener = UnixListener::bind(&socket).unwrap();
        let pki = Pki::new();
        let minter = Arc::new(FakeMinter::new());
        let bundle = Arc::new(Bundle {
            x509_authorities: vec![pki.root_der.clone()],
            jwt_authorities_json: minter.jwks(&pki.root_der),
            sequence: 1,
        });
        let (tx, rx) = watch::channel(Arc::new(Snapshot::empty(TrustDomain::new(TD).unwrap())));
        let api = configure(WorkloadApi::new(rx, attestor(), minter.clone()));
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(api.serve(listener, async move {
            let _ = stopped.await;
        }));
        Self {
            _dir: dir,
            socket,
            pki,
            minter,
            bundle,
            tx,
            stop: Some(stop),
            task: Some(task),
        }
    }

    fn endpoint(&self) -> String {
        format!("unix://{}", self.socket.display())
    }

    async fn client(&self) -> WorkloadApiClient {
        WorkloadApiClient::connect_to(self.endpoint())
            .await
            .unwrap()
    }

    async fn raw_client(&self) -> SpiffeWorkloadApiClient<tonic::transport::Channel> {
        SpiffeWorkloadApiClient::new(
            meshid_api::client::connect_unix(&self.socket)
                .await
                .unwrap(),
        )
    }

    /// Publishes a synced snapshot of these identities (entries also registered with the
    /// minter).
    fn publish(&self, identities: Vec<(Entry, Option<Svid>)>) {
        self.publish_with(identities, true);
    }

    fn publish_with(&self, identities: Vec<(Entry, Option<Svid>)>, synced: bool) {
        let mut identities: Vec<Identity> = identities
            .into_iter()
            .map(|(e, s)| {
                self.minter
                    .ids
                    .lock()
                    .unwrap()
                    .insert(e.id.clone(), e.spiffe_id.to_string());
                Identity {
                    entry: Arc::new(e),
                    svid: s.map(Arc::new),
                }
            })
            .collect();
        identities.sort_by(|a, b| a.entry.id.cmp(&b.entry.id));
        self.publish_snapshot(Snapshot {
            trust_domain: TrustDomain::new(TD).unwrap(),
            bundle: Arc::clone(&self.bundle),
            identities,
            synced,
            tainted_jwt_kids: Arc::default(),
            crls: Arc::default(),
            crl_generation: 0,
            policy: Arc::default(),
            policy_merged: None,
            federated: Arc::default(),
        });
    }

    fn publish_snapshot(&self, snap: Snapshot) {
        self.tx.send_replace(Arc::new(snap));
    }

    /// Republishes the current snapshot as a new, identical value.
    fn republish(&self) {
        let same = Snapshot::clone(&self.tx.borrow());
        self.publish_snapshot(same);
    }

    async fn shutdown(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            task.await.unwrap().unwrap();
        }
    }
}

/// A request with the security header, as SPIFFE clients send it.
fn with_header<T>(message: T) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request
        .metadata_mut()
        .insert("workload.spiffe.io", "true".parse().unwrap());
    request
}

// ---------------------------------------------------------------------------------------------
// X.509

#[tokio::test]
async fn fetch_x509_svid_returns_svid_key_and_default_first() {
    bounded(async {
        let agent = Agent::start().await;
        let svid = agent.pki.svid(TEST_ID);
        let (leaf, key) = (svid.chain[0].clone(), svid.key_pkcs8.to_vec());
        let other = agent.pki.svid("spiffe://example.org/other");
        agent.publish(vec![
            (entry("e1", TEST_ID, &[&own_uid_selector()], ""), Some(svid)),
            (
                entry(
                    "e2",
                    "spiffe://example.org/other",
                    &[&own_uid_selector()],
                    "other",
                ),
                Some(other),
            ),
            (
                entry(
                    "e3",
                    "spiffe://example.org/stranger",
                    &["unix:uid:4294967294"],
                    "",
                ),
                Some(agent.pki.svid("spiffe://example.org/stranger")),
            ),
        ]);
        let client = agent.client().await;

        let got = client.fetch_x509_svid().await.unwrap();
        assert_eq!(got.spiffe_id().to_string(), TEST_ID);
        assert_eq!(got.leaf().as_bytes(), leaf.as_slice());
        assert_eq!(got.private_key().as_bytes(), key.as_slice());

        let all = client.fetch_all_x509_svids().await.unwrap();
        let ids: Vec<String> = all.iter().map(|s| s.spiffe_id().to_string()).collect();
        assert_eq!(ids, [TEST_ID, "spiffe://example.org/other"]);
        assert_eq!(all[1].hint(), Some("other"));

        let ctx = client.fetch_x509_context().await.unwrap();
        let td = TrustDomain::new(TD).unwrap();
        let bundle = ctx.bundle_set().get(&td).unwrap();
        assert_eq!(
            bundle.authorities()[0].as_bytes(),
            agent.pki.root_der.as_slice()
        );
        agent.shutdown().await;
    })
    .await;
}

#[tokio::test]
async fn fetch_x509_bundles_returns_local_bundle() {
    bounded(async {
        let agent = Agent::start().await;
        agent.publish(vec![(
            entry("e1", TEST_ID, &[&own_uid_selector()], ""),
            Some(agent.pki.svid(TEST_ID)),
        )]);
        let bundles = agent.client().await.fetch_x509_bundles().await.unwrap();
        let bundle = bundles.get(&TrustDomain::new(TD).unwrap()).unwrap();
        assert_eq!(bundle.authorities().len(), 1);
        assert_eq!(
            bundle.authorities()[0].as_bytes(),
            agent.pki.root_der.as_slice()
        );
        agent.shutdown().await;
    })
    .await;
}

#[tokio::test]
async fn stream_sends_rotation_but_not_duplicates() {
    bounded(async {
        let agent = Agent::start().await;
        let e = entry("e1", TEST_ID, &[&own_uid_selector()], "");
        let first = agent.pki.svid(TEST_ID);
        let first_leaf = first.chain[0].clone();
        agent.publish(vec![(e.clone(), Some(first))]);

        let mut stream = agent.client().await.stream_x509_contexts().await.unwrap();
        let ctx = stream.next().await.unwrap().unwrap();
        assert_eq!(
            ctx.default_svid().unwrap().leaf().as_bytes(),
            first_leaf.as_slice()
        );

        // The same content, published again, sends nothing.
        agent.republish();
        assert!(
            tokio::time::timeout(QUIET, stream.next()).await.is_err(),
            "identical snapshot was resent"
        );

        // A new SVID (rotation) is sent.
        let rotated = agent.pki.svid(TEST_ID);
        let rotated_leaf = rotated.chain[0].clone();
        agent.publish(vec![(e, Some(rotated))]);
        let ctx = stream.next().await.unwrap().unwrap();
        assert_eq!(
            ctx.default_svid().unwrap().leaf().as_bytes(),
            rotated_leaf.as_slice()
        );
        assert!(tokio::time::timeout(QUIET, stream.next()).await.is_err());
        agent.shutdown().await;
    })
    .await;
}

#[tokio::test]
async fn deleted_entry_ends_stream_with_no_identity_issued() {
    bounded(async {
        let agent = Agent::start().await;
        agent.publish(vec![(
            entry("e1", TEST_ID, &[&own_uid_selector()], ""),
            Some(agent.pki.svid(TEST_ID)),
        )]);
        let mut stream = agent.client().await.stream_x509_contexts().await.unwrap();
        stream.next().await.unwrap().unwrap();

        agent.publish(vec![]);
        let err = stream.next().await.unwrap().unwrap_err();
        assert!(matches!(err, WorkloadApiError::NoIdentityIssued), "{err:?}");
        assert!(stream.next().await.is_none(), "stream ends after redaction");
        agent.shutdown().await;
    })
    .await;
}

#[tokio::test]
async fn unmatched_caller_gets_no_identity_issued() {
    bounded(async {
        let agent = Agent::start().await;
        // The entry is for another uid: this process must not get it.
        let other_uid = own_ids().0.wrapping_add(1);
        agent.publish(vec![(
            entry("e1", TEST_ID, &[&format!("unix:uid:{other_uid}")], ""),
            Some(agent.pki.svid(TEST_ID)),
        )]);
        let client = agent.client().await;

        let err = client.fetch_x509_svid().await.unwrap_err();
        assert!(err.to_string().contains("no identity issued"), "{err}");
        assert!(matches!(err, WorkloadApiError::NoIdentityIssued));
        let err = client.fetch_x509_bundles().await.unwrap_err();
        assert!(matches!(err, WorkloadApiError::NoIdentityIssued), "{err:?}");
        let err = client.fetch_jwt_svid(&["aud"], None).await.unwrap_err();
        assert!(matches!(err, WorkloadApiError::NoIdentityIssued), "{err:?}");

        let status = agent
            .raw_client()
            .await
            .fetch_x509svid(with_header(X509svidRequest {}))
            .await
            .unwrap_err();
        assert_eq!(status.code(), tonic::Code::PermissionDenied);
        assert_eq!(status.message(), "no identity issued");

        // ValidateJWTSVID answers it all the same (as SPIRE's agent does): a bad token is
        // InvalidArgument, not PermissionDenied.
        let status = agent
            .raw_client()
            .await
            .validate_jwtsvid(with_header(ValidateJwtsvidRequest {
                audience: "aud".into(),
                svid: "not.a.token".into(),
            }))
            .await
            .unwrap_err();
        assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
        agent.shutdown().await;
    })
    .await;
}

#[tokio::test]
async fn request_without_security_header_is_invalid_argument() {
    bounded(async {
        let agent = Agent::start().await;
        agent.publish(vec![(
            entry("e1", TEST_ID, &[&own_uid_selector()], ""),
            Some(agent.pki.svid(TEST_ID)),
        )]);
        let mut raw = agent.raw_client().await;

        let status = raw
            .fetch_x509svid(tonic::Request::new(X509svidRequest {}))
            .await
            .unwrap_err();
        assert_eq!(status.code(), tonic::Code::InvalidArgument);
        assert_eq!(status.message(), "security header missing from request");

        let mut wrong = tonic::Request::new(JwtsvidRequest {
            audience: vec!["a".into()],
            spiffe_id: String::new(),
        });
        wrong
            .metadata_mut()
            .insert("workload.spiffe.io", "TRUE".parse().unwrap());
        let status = raw.fetch_jwtsvid(wrong).await.unwrap_err();
        assert_eq!(status.code(), tonic::Code::InvalidArgument);

        // With the header, the same connection is served.
        let mut ok = raw
            .fetch_x509svid(with_header(X509svidRequest {}))
            .await
            .unwrap()
            .into_inner();
        let first = ok.message().await.unwrap().unwrap();
        assert_eq!(first.svids.len(), 1);
        assert!(first.federated_bundles.is_empty());
        agent.shutdown().await;
    })
    .await;
}

#[tokio::test]
async fn waits_for_sync_and_signing_before_answering() {
    bounded(async {
        let agent = Agent::start().await;
        let e = entry("e1", TEST_ID, &[&own_uid_selector()], "");
        let client = agent.client().await;
        let fetch = tokio::spawn(async move { client.fetch_x509_svid().await });

        // Unsynced, then synced without an SVID: the call keeps waiting.
        tokio::time::sleep(Duration::from_millis(200)).await;
        agent.publish(vec![(e.clone(), None)]);
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(!fetch.is_finished());

        agent.publish(vec![(e, Some(agent.pki.svid(TEST_ID)))]);
        let svid = fetch.await.unwrap().unwrap();
        assert_eq!(svid.spiffe_id().to_string(), TEST_ID);
        agent.shutdown().await;
    })
    .await;
}

#[tokio::test]
async fn unsynced_agent_answers_unavailable_after_the_wait() {
    bounded(async {
        let agent = Agent::start_with(|api| api.with_ready_wait(Duration::from_millis(300))).await;
        let mut raw = agent.raw_client().await;
        let status = raw
            .fetch_x509svid(with_header(X509svidRequest {}))
            .await
            .unwrap_err();
        assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");

        // Synced, the entry matches, but nothing is signed: still Unavailable, not denied.
        agent.publish(vec![(
            entry("e1", TEST_ID, &[&own_uid_selector()], ""),
            None,
        )]);
        let status = raw
            .fetch_x509svid(with_header(X509svidRequest {}))
            .await
            .unwrap_err();
        assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
        agent.shutdown().await;
    })
    .await;
}

#[tokio::test]
async fn x509_source_becomes_ready_and_rotates() {
    bounded(async {
        let agent = Agent::start().await;
        let e = entry("e1", TEST_ID, &[&own_uid_selector()], "");
        agent.publish(vec![(e.clone(), Some(agent.pki.svid(TEST_ID)))]);

        let source = X509Source::builder()
            .endpoint(agent.endpoint())
            .initial_sync_timeout(Duration::from_secs(10))
            .build()
            .await
            .unwrap();
        let first = source.svid().unwrap();
        assert_eq!(first.spiffe_id().to_string(), TEST_ID);
        let mut updates = source.updated();

        let rotated = agent.pki.svid(TEST_ID);
        let rotated_leaf = rotated.chain[0].clone();
        agent.publish(vec![(e, Some(rotated))]);
        tokio::time::timeout(Duration::from_secs(10), updates.changed())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            source.svid().unwrap().leaf().as_bytes(),
            rotated_leaf.as_slice()
        );

        source
            .shutdown_with_timeout(Duration::from_secs(5))
            .await
            .unwrap();
        agent.shutdown().await;
    })
    .await;
}

#[tokio::test]
async fn shutdown_ends_open_streams() {
    bounded(async {
        let agent = Agent::start().await;
        agent.publish(vec![(
            entry("e1", TEST_ID, &[&own_uid_selector()], ""),
            Some(agent.pki.svid(TEST_ID)),
        )]);
        let mut stream = agent.client().await.stream_x509_contexts().await.unwrap();
        stream.next().await.unwrap().unwrap();
        // Shutdown completes although the stream is open, and the stream ends.
        agent.shutdown().await;
        match stream.next().await {
            None => {}
            Some(Err(e)) => assert!(!matches!(e, WorkloadApiError::NoIdentityIssued), "{e:?}"),
            Some(Ok(_)) => panic!("message after shutdown"),
        }
    })
    .await;
}

// ---------------------------------------------------------------------------------------------
// JWT

#[tokio::test]
async fn jwt_svid_is_minted_cached_and_validates() {
    bounded(async {
        let agent = Agent::start().await;
        agent.publish(vec![
            (entry("e1", TEST_ID, &[&own_uid_selector()], "main"), None),
            (
                entry(
                    "e2",
                    "spiffe://example.org/second",
                    &[&own_uid_selector()],
                    "",
                ),
                None,
            ),
        ]);
        let client = agent.client().await;

        let svid = client.fetch_jwt_svid(&["aud-1"], None).await.unwrap();
        assert_eq!(svid.spiffe_id().to_string(), TEST_ID);
        assert_eq!(svid.audience(), ["aud-1"]);
        assert_eq!(svid.hint(), Some("main"));

        // Without a SPIFFE ID, one per identity is minted (the client keeps the first); they
        // are reused within half their lifetime, and a new audience mints new ones.
        assert_eq!(agent.minter.mints.load(Ordering::Relaxed), 2);
        let again = client.fetch_jwt_svid(&["aud-1"], None).await.unwrap();
        assert_eq!(again.token(), svid.token());
        assert_eq!(agent.minter.mints.load(Ordering::Relaxed), 2);
        let all = client.fetch_all_jwt_svids(&["aud-2"], None).await.unwrap();
        assert_eq!(all.len(), 2);
        assert_eq!(agent.minter.mints.load(Ordering::Relaxed), 4);

        // A specific SPIFFE ID.
        let second = SpiffeId::new("spiffe://example.org/second").unwrap();
        let only = client
            .fetch_jwt_svid(&["aud-1"], Some(&second))
            .await
            .unwrap();
        assert_eq!(only.spiffe_id(), &second);
        let stranger = SpiffeId::new("spiffe://example.org/stranger").unwrap();
        let err = client
            .fetch_jwt_svid(&["aud-1"], Some(&stranger))
            .await
            .unwrap_err();
        assert!(matches!(err, WorkloadApiError::NoIdentityIssued), "{err:?}");

        // Validation through the agent.
        let validated = client
            .validate_jwt_token("aud-1", svid.token())
            .await
            .unwrap();
        assert_eq!(validated.spiffe_id().to_string(), TEST_ID);
        let err = client
            .validate_jwt_token("someone-else", svid.token())
            .await
            .unwrap_err();
        assert!(err.is_invalid_argument(), "{err:?}");

        // The raw response: claims as a Struct with numeric exp.
        let mut raw = agent.raw_client().await;
        let response = raw
            .validate_jwtsvid(with_header(ValidateJwtsvidRequest {
                audience: "aud-1".into(),
                svid: svid.token().into(),
            }))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(response.spiffe_id, TEST_ID);
        let claims = response.claims.unwrap();
        assert!(matches!(
            claims.fields["exp"].kind,
            Some(prost_types::value::Kind::NumberValue(exp)) if exp > 0.0 && exp.fract() == 0.0
        ));

        // Mandatory fields.
        for request in [
            ValidateJwtsvidRequest {
                audience: String::new(),
                svid: svid.token().into(),
            },
            ValidateJwtsvidRequest {
                audience: "aud-1".into(),
                svid: String::new(),
            },
        ] {
            let status = raw
                .validate_jwtsvid(with_header(request))
                .await
                .unwrap_err();
            assert_eq!(status.code(), tonic::Code::InvalidArgument);
        }
        let status = raw
            .fetch_jwtsvid(with_header(JwtsvidRequest {
                audience: Vec::new(),
                spiffe_id: String::new(),
            }))
            .await
            .unwrap_err();
        assert_eq!(status.code(), tonic::Code::InvalidArgument);
        assert_eq!(status.message(), "audience must be specified");
        agent.shutdown().await;
    })
    .await;
}

#[tokio::test]
async fn jwt_mint_failure_is_unavailable() {
    bounded(async {
        let agent = Agent::start().await;
        agent.publish(vec![(
            entry("e1", TEST_ID, &[&own_uid_selector()], ""),
            None,
        )]);
        agent.minter.unavailable.store(true, Ordering::Relaxed);
        let status = agent
            .raw_client()
            .await
            .fetch_jwtsvid(with_header(JwtsvidRequest {
                audience: vec!["aud".into()],
                spiffe_id: String::new(),
            }))
            .await
            .unwrap_err();
        assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
        agent.shutdown().await;
    })
    .await;
}

#[tokio::test]
async fn fetch_jwt_bundles_returns_only_jwt_authorities() {
    bounded(async {
        let agent = Agent::start().await;
        agent.publish(vec![(
            entry("e1", TEST_ID, &[&own_uid_selector()], ""),
            None,
        )]);
        let client = agent.client().await;
        let bundles = client.fetch_jwt_bundles().await.unwrap();
        let bundle = bundles.get(&TrustDomain::new(TD).unwrap()).unwrap();
        assert!(bundle.find_jwt_authority(JWT_KID).is_some());
        assert_eq!(bundle.jwt_authorities().count(), 1);

        // The stream resends only on change.
        let mut stream = client.stream_jwt_bundles().await.unwrap();
        stream.next().await.unwrap().unwrap();
        agent.republish();
        assert!(tokio::time::timeout(QUIET, stream.next()).await.is_err());
        agent.shutdown().await;
    })
    .await;
}

// ---------------------------------------------------------------------------------------------
// A workload running as another user.

const CHILD_SOCKET_ENV: &str = "MESHID_TEST_OTHER_UID_SOCKET";
const OTHER_UID: u32 = 65534;

/// Run by [`other_uid_is_refused`] in a child process as another user; skipped otherwise.
#[tokio::test]
#[ignore = "run as a child process by other_uid_is_refused"]
async fn child_process_as_other_uid() {
    let Ok(socket) = std::env::var(CHILD_SOCKET_ENV) else {
        return;
    };
    assert_eq!(own_ids().0, OTHER_UID);
    let client = WorkloadApiClient::connect_to(format!("unix://{socket}"))
        .await
        .unwrap();
    let err = client.fetch_x509_svid().await.unwrap_err();
    assert!(matches!(err, WorkloadApiError::NoIdentityIssued), "{err:?}");
}

#[tokio::test]
async fn other_uid_is_refused() {
    bounded(async {
        if own_ids().0 != 0 {
            // Without root there is no second user to run as; the uid+1 entry in
            // unmatched_caller_gets_no_identity_issued covers the matching logic.
            eprintln!("skipped: needs root to run a workload as another user");
            return;
        }
        let agent = Agent::start().await;
        agent.publish(vec![(
            entry("e1", TEST_ID, &[&own_uid_selector()], ""),
            Some(agent.pki.svid(TEST_ID)),
        )]);
        // This process (root) is served...
        agent.client().await.fetch_x509_svid().await.unwrap();

        // ...a process of another user, connecting to the same socket, is not.
        let dir = agent.socket.parent().unwrap();
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::set_permissions(&agent.socket, std::fs::Permissions::from_mode(0o777)).unwrap();
        let mut child = std::process::Command::new(std::env::current_exe().unwrap());
        {
            use std::os::unix::process::CommandExt as _;
            child.uid(OTHER_UID).gid(OTHER_UID);
        }
        let output = tokio::process::Command::from(child)
            .args([
                "--exact",
                "workload_api::child_process_as_other_uid",
                "--ignored",
                "--nocapture",
            ])
            .env(CHILD_SOCKET_ENV, &agent.socket)
            .current_dir("/")
            .output()
            .await
            .unwrap();
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert!(
            output.status.success(),
            "child failed: {stdout}{}",
            String::from_utf8_lossy(&output.stderr)
        );
        assert!(
            stdout.contains("1 passed"),
            "child test did not run: {stdout}"
        );
        agent.shutdown().await;
    })
    .await;
}
