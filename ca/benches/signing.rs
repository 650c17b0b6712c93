//! The CA's signing path, against its baselines, in one run.
//!
//! 1. `raw_p256_sign`: raw ECDSA P-256 signing with aws-lc-rs (the crypto library of meshid) of a 300-byte message (the floor: every
//!    certificate costs at least one such signature).
//! 2. `leaf_no_csr`: building and signing an X509-SVID leaf with no CSR
//!    ([`sign_x509_svid_with_key`]).
//! 3. `csr_to_leaf`: the full signing path: [`parse_csr`] (parse and verify the CSR's
//!    self-signature) then [`sign_x509_svid`] (build and sign the leaf).
//! 4. `csr_parse_verify`: [`parse_csr`] alone, to show where (3) spends its time.
//!
//! Criterion prints each case in elements (certificates) per second. After the groups, when run
//! by `cargo bench`, a plain timed loop per case prints a summary to stderr with the ratios of
//! (3) to (1) and (3) to (2). Run:
//!
//! ```text
//! cargo bench -p meshid-ca --bench signing -- --warm-up-time 1 --measurement-time 3
//! ```

// A benchmark binary: setup failures should abort loudly.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::hint::black_box;
use std::time::{Duration, Instant, SystemTime};

use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::signature::{EcdsaKeyPair, ECDSA_P256_SHA256_ASN1_SIGNING};
use criterion::{Criterion, Throughput};
use meshid_ca::svid::{
    generate_intermediate, generate_root, parse_csr, sign_x509_svid, sign_x509_svid_with_key,
    CaKey, Issuer, KeyType,
};
use spiffe::{SpiffeId, TrustDomain};

const HOUR: Duration = Duration::from_secs(3600);

struct Setup {
    raw_key: EcdsaKeyPair,
    message: Vec<u8>,
    issuer: Issuer,
    subject_key: CaKey,
    csr_der: Vec<u8>,
    id: SpiffeId,
    dns: Vec<String>,
}

fn setup() -> Setup {
    let rng = SystemRandom::new();
    let doc = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, &rng).unwrap();
    let raw_key = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, doc.as_ref()).unwrap();

    let now = SystemTime::now();
    let td = TrustDomain::new("example.org").unwrap();
    let root_key = CaKey::generate(KeyType::EcP256).unwrap();
    let root_cert = generate_root(&td, &root_key, 24 * HOUR, now).unwrap();
    let root = Issuer::new(root_cert, root_key, Vec::new()).unwrap();
    let inter_key = CaKey::generate(KeyType::EcP256).unwrap();
    let inter_cert = generate_intermediate(&root, &td, &inter_key, 24 * HOUR, now).unwrap();
    let issuer = Issuer::new(inter_cert, inter_key, root.chain_for_child()).unwrap();

    // A workload's CSR, as an agent would send it.
    let workload_key = rcgen::KeyPair::generate().unwrap();
    let csr_der = rcgen::CertificateParams::new(Vec::<String>::new())
        .unwrap()
        .serialize_request(&workload_key)
        .unwrap()
        .der()
        .to_vec();

    Setup {
        raw_key,
        message: vec![0x5a; 300],
        issuer,
        subject_key: CaKey::generate(KeyType::EcP256).unwrap(),
        csr_der,
        id: SpiffeId::new("spiffe://example.org/ns/prod/sa/web").unwrap(),
        dns: vec!["web.prod.example.org".to_string()],
    }
}

/// A named case: a closure doing one unit of work.
type Case<'a> = (&'static str, Box<dyn Fn() + 'a>);

/// The cases, each a closure doing one unit of work.
fn cases(s: &Setup) -> Vec<Case<'_>> {
    let rng = SystemRandom::new();
    vec![
        (
            "raw_p256_sign",
            Box::new(move || {
                black_box(s.raw_key.sign(&rng, black_box(&s.message)).unwrap());
            }),
        ),
        (
            "leaf_no_csr",
            Box::new(|| {
                black_box(
                    sign_x509_svid_with_key(
                        &s.issuer,
                        &s.subject_key,
                        &s.id,
                        &s.dns,
                        HOUR,
                        SystemTime::now(),
                    )
                    .unwrap(),
                );
            }),
        ),
        (
            "csr_to_leaf",
            Box::new(|| {
                let csr = parse_csr(black_box(&s.csr_der)).unwrap();
                black_box(
                    sign_x509_svid(&s.issuer, &csr, &s.id, &s.dns, HOUR, SystemTime::now())
                        .unwrap(),
                );
            }),
        ),
        (
            "csr_parse_verify",
            Box::new(|| {
                black_box(parse_csr(black_box(&s.csr_der)).unwrap());
            }),
        ),
    ]
}

/// Runs `f` for about `budget` and returns operations per second.
fn rate(f: &dyn Fn(), budget: Duration) -> f64 {
    for _ in 0..100 {
        f();
    }
    let start = Instant::now();
    let mut n = 0u64;
    while start.elapsed() < budget {
        for _ in 0..50 {
            f();
        }
        n += 50;
    }
    n as f64 / start.elapsed().as_secs_f64()
}

fn main() {
    let s = setup();
    let cases = cases(&s);

    let mut c = Criterion::default().configure_from_args();
    {
        let mut group = c.benchmark_group("signing");
        group.throughput(Throughput::Elements(1));
        for (name, f) in &cases {
            group.bench_function(*name, |b| b.iter(f));
        }
        group.finish();
    }
    c.final_summary();

    // `cargo bench` passes --bench; `cargo test --benches` does not, and needs no summary.
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    let rates: Vec<(&str, f64)> = cases
        .iter()
        .map(|(name, f)| (*name, rate(f.as_ref(), Duration::from_secs(2))))
        .collect();
    eprintln!("\nsummary (plain timed loop, 2 s per case, one thread):");
    for (name, r) in &rates {
        eprintln!("  {name:<18} {r:>10.0} certs/s  ({:.1} us each)", 1e6 / r);
    }
    let get = |n: &str| {
        rates
            .iter()
            .find(|(name, _)| *name == n)
            .map(|(_, r)| *r)
            .unwrap_or(f64::NAN)
    };
    let full = get("csr_to_leaf");
    eprintln!(
        "  ratio csr_to_leaf / raw_p256_sign = {:.3}",
        full / get("raw_p256_sign")
    );
    eprintln!(
        "  ratio csr_to_leaf / leaf_no_csr    = {:.3}",
        full / get("leaf_no_csr")
    );
}
