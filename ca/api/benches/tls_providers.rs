//! The crypto provider choice on evidence (issue 16, point 1): ring against aws-lc-rs, with and
//! without the hybrid post-quantum group X25519MLKEM768, in one run.
//!
//! Every case runs both ends in this one thread, over memory: no socket, no scheduler, only the
//! TLS work of a meshid hop.
//!
//! - `handshake`: a full mutual TLS 1.3 handshake as the proxies and the node API make it (ECDSA
//!   P-256 leaves under a P-256 CA, the client certificate verified by the server, AES-128-GCM),
//!   client and server together. Reported in handshakes per second of one core.
//! - `bulk`: 64 MiB of application data in 16 KiB writes through one established connection,
//!   sealed by one end and opened by the other. Reported in MB/s of one core doing both.
//!
//! The cases run in interleaved rounds (every configuration once per round, so a noisy moment of
//! the machine hits them all) and the median of the rounds is printed, with each configuration's
//! ratio to the first. Run:
//!
//! ```text
//! cargo bench -p meshid-api --bench tls_providers
//! ```
//!
//! `MESHID_BENCH_ROUNDS` (default 7) sets the rounds.

// A benchmark binary: setup failures should abort loudly.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::print_stdout,
    clippy::print_stderr
)]

use std::io::{Read, Write};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, ClientConnection, RootCertStore, ServerConfig, ServerConnection};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};

/// One configuration under test.
struct Case {
    name: &'static str,
    client: Arc<ClientConfig>,
    server: Arc<ServerConfig>,
}

/// A provider restricted as meshid's is (TLS 1.3 suites, AES-128-GCM first) with the given key
/// exchange groups, in order of preference.
fn restrict(
    mut p: CryptoProvider,
    kx: Vec<&'static dyn rustls::crypto::SupportedKxGroup>,
) -> Arc<CryptoProvider> {
    meshid_api::tls::provider::tls13_suites_aes128_first(&mut p);
    p.kx_groups = kx;
    Arc::new(p)
}

struct Pki {
    root: CertificateDer<'static>,
    server: (Vec<CertificateDer<'static>>, PrivatePkcs8KeyDer<'static>),
    client: (Vec<CertificateDer<'static>>, PrivatePkcs8KeyDer<'static>),
}

fn pki() -> Pki {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair, SanType};
    let alg = &rcgen::PKCS_ECDSA_P256_SHA256;
    let ca_key = KeyPair::generate_for(alg).unwrap();
    let mut ca = CertificateParams::new(Vec::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca, ca_key);
    let leaf = |uri: &str| {
        let key = KeyPair::generate_for(alg).unwrap();
        let mut p = CertificateParams::new(vec!["localhost".to_owned()]).unwrap();
        p.subject_alt_names
            .push(SanType::URI(uri.try_into().unwrap()));
        let cert = p.signed_by(&key, &issuer).unwrap();
        (
            vec![cert.der().clone()],
            PrivatePkcs8KeyDer::from(key.serialize_der()),
        )
    };
    Pki {
        root: ca_cert.der().clone(),
        server: leaf("spiffe://example.org/server"),
        client: leaf("spiffe://example.org/client"),
    }
}

fn case(name: &'static str, provider: &Arc<CryptoProvider>, pki: &Pki) -> Case {
    let mut roots = RootCertStore::empty();
    roots.add(pki.root.clone()).unwrap();
    let roots = Arc::new(roots);
    let client_verifier =
        WebPkiClientVerifier::builder_with_provider(Arc::clone(&roots), Arc::clone(provider))
            .build()
            .unwrap();
    let server = ServerConfig::builder_with_provider(Arc::clone(provider))
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_client_cert_verifier(client_verifier)
        .with_single_cert(
            pki.server.0.clone(),
            PrivateKeyDer::Pkcs8(pki.server.1.clone_key()),
        )
        .unwrap();
    let server_verifier =
        WebPkiServerVerifier::builder_with_provider(Arc::clone(&roots), Arc::clone(provider))
            .build()
            .unwrap();
    let mut client = ClientConfig::builder_with_provider(Arc::clone(provider))
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_webpki_verifier(server_verifier)
        .with_client_auth_cert(
            pki.client.0.clone(),
            PrivateKeyDer::Pkcs8(pki.client.1.clone_key()),
        )
        .unwrap();
    // Every iteration is a full handshake, as a new meshid hop is.
    client.resumption = rustls::client::Resumption::disabled();
    Case {
        name,
        client: Arc::new(client),
        server: Arc::new(server),
    }
}

fn pump_client_to_server(c: &mut ClientConnection, s: &mut ServerConnection, buf: &mut Vec<u8>) {
    buf.clear();
    while c.wants_write() {
        c.write_tls(buf).unwrap();
    }
    let mut rd = &buf[..];
    while !rd.is_empty() {
        s.read_tls(&mut rd).unwrap();
        s.process_new_packets().unwrap();
    }
}

fn pump_server_to_client(s: &mut ServerConnection, c: &mut ClientConnection, buf: &mut Vec<u8>) {
    buf.clear();
    while s.wants_write() {
        s.write_tls(buf).unwrap();
    }
    let mut rd = &buf[..];
    while !rd.is_empty() {
        c.read_tls(&mut rd).unwrap();
        c.process_new_packets().unwrap();
    }
}

/// One full handshake; returns the connections, established.
fn handshake(case: &Case, buf: &mut Vec<u8>) -> (ClientConnection, ServerConnection) {
    let mut c = ClientConnection::new(
        Arc::clone(&case.client),
        ServerName::try_from("localhost").unwrap(),
    )
    .unwrap();
    let mut s = ServerConnection::new(Arc::clone(&case.server)).unwrap();
    while c.is_handshaking() || s.is_handshaking() {
        pump_client_to_server(&mut c, &mut s, buf);
        pump_server_to_client(&mut s, &mut c, buf);
    }
    (c, s)
}

fn handshakes_per_sec(case: &Case, budget: Duration) -> f64 {
    let mut buf = Vec::with_capacity(1 << 16);
    let start = Instant::now();
    let mut n = 0u64;
    while start.elapsed() < budget {
        let (c, s) = handshake(case, &mut buf);
        std::hint::black_box((c, s));
        n += 1;
    }
    n as f64 / start.elapsed().as_secs_f64()
}

const BULK_BYTES: usize = 64 << 20;

fn bulk_mb_per_sec(case: &Case) -> f64 {
    let mut buf = Vec::with_capacity(1 << 20);
    let (mut c, mut s) = handshake(case, &mut buf);
    let chunk = vec![0x5au8; 16 << 10];
    let mut sink = vec![0u8; 64 << 10];
    let start = Instant::now();
    let mut sent = 0;
    while sent < BULK_BYTES {
        c.writer().write_all(&chunk).unwrap();
        sent += chunk.len();
        pump_client_to_server(&mut c, &mut s, &mut buf);
        loop {
            match s.reader().read(&mut sink) {
                Ok(0) => break,
                Ok(n) => {
                    std::hint::black_box(&sink[..n]);
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) => panic!("{e}"),
            }
        }
    }
    BULK_BYTES as f64 / 1e6 / start.elapsed().as_secs_f64()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    // `cargo bench` passes `--bench`; a filter is not supported: every case runs, so the ratios
    // are of one run.
    let rounds: usize = std::env::var("MESHID_BENCH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(7);
    let pki = pki();
    let ring = rustls::crypto::ring::default_provider();
    let aws = rustls::crypto::aws_lc_rs::default_provider();
    let x25519_ring = rustls::crypto::ring::kx_group::X25519;
    let x25519_aws = rustls::crypto::aws_lc_rs::kx_group::X25519;
    let hybrid = rustls::crypto::aws_lc_rs::kx_group::X25519MLKEM768;
    let cases = [
        case(
            "ring, X25519",
            &restrict(ring.clone(), vec![x25519_ring]),
            &pki,
        ),
        case(
            "aws-lc-rs, X25519",
            &restrict(aws.clone(), vec![x25519_aws]),
            &pki,
        ),
        case(
            "aws-lc-rs, X25519MLKEM768",
            &restrict(aws, vec![hybrid, x25519_aws]),
            &pki,
        ),
        case(
            "ring + aws-lc-rs ML-KEM, X25519MLKEM768",
            &restrict(ring, vec![hybrid, x25519_ring]),
            &pki,
        ),
    ];
    // Each case negotiates what it says.
    let mut buf = Vec::new();
    for c in &cases {
        let (client, _) = handshake(c, &mut buf);
        let group = client.negotiated_key_exchange_group().unwrap().name();
        eprintln!("{}: negotiated {group:?}", c.name);
    }
    let mut hs: Vec<Vec<f64>> = vec![Vec::new(); cases.len()];
    let mut bulk: Vec<Vec<f64>> = vec![Vec::new(); cases.len()];
    for round in 0..rounds {
        for (i, c) in cases.iter().enumerate() {
            hs[i].push(handshakes_per_sec(c, Duration::from_millis(1500)));
            bulk[i].push(bulk_mb_per_sec(c));
        }
        eprintln!("round {}/{rounds} done", round + 1);
    }
    let hs: Vec<f64> = hs.into_iter().map(median).collect();
    let bulk: Vec<f64> = bulk.into_iter().map(median).collect();
    println!("| provider, group | mTLS handshakes/s (one core, both ends) | ratio | bulk MB/s (one core, seal + open) | ratio |");
    println!("|---|---:|---:|---:|---:|");
    for (i, c) in cases.iter().enumerate() {
        println!(
            "| {} | {:.0} | {:.2} | {:.0} | {:.2} |",
            c.name,
            hs[i],
            hs[i] / hs[0],
            bulk[i],
            bulk[i] / bulk[0]
        );
    }
}
