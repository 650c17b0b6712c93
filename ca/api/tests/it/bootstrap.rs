//! Regenerates the checked-in protobuf code and fails on any difference, so the generated code
//! can never drift from the `.proto` files (and builds need no `protoc`).

#![allow(clippy::expect_used)]

use std::path::{Path, PathBuf};

/// meshid's own APIs, with tonic's default prost codec.
const PROTOS: &[&str] = &[
    "meshid/admin/v1/admin.proto",
    "meshid/node/v1/node.proto",
    "meshid/policy/v1/policy.proto",
];
/// The Workload API, with the lean codec (small per-stream buffers; see src/codec.rs).
const WORKLOAD_PROTOS: &[&str] = &["workload.proto"];

fn generate_with(out_dir: &Path, protos: &[&str], codec: &str) {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let includes = [root.join("proto")];
    let files: Vec<PathBuf> = protos.iter().map(|p| root.join("proto").join(p)).collect();
    let fds = protox::compile(&files, &includes).expect("compile protos");
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .codec_path(codec)
        .out_dir(out_dir)
        .compile_fds(fds)
        .expect("generate code");
}

fn generate(out_dir: &Path) {
    generate_with(out_dir, PROTOS, "tonic_prost::ProstCodec");
    generate_with(out_dir, WORKLOAD_PROTOS, "crate::codec::LeanCodec");
}

#[test]
fn generated_code_is_up_to_date() {
    let tmp = tempfile::tempdir().expect("tempdir");
    generate(tmp.path());
    let checked_in = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("src/gen");
    let mut stale = Vec::new();
    for entry in std::fs::read_dir(tmp.path()).expect("read generated") {
        let entry = entry.expect("entry");
        let name = entry.file_name();
        let fresh = std::fs::read_to_string(entry.path()).expect("read fresh");
        let old = std::fs::read_to_string(checked_in.join(&name)).unwrap_or_default();
        if fresh != old {
            if std::env::var_os("MESHID_BLESS").is_some() {
                std::fs::write(checked_in.join(&name), &fresh).expect("bless");
            } else {
                stale.push(name.to_string_lossy().into_owned());
            }
        }
    }
    assert!(
        stale.is_empty(),
        "generated code in ca/api/src/gen is stale: {stale:?}; run `MESHID_BLESS=1 cargo test -p meshid-api --test it bootstrap` and commit"
    );
}
