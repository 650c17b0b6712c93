//! Every request message the CA and the agent accept decodes without panicking, and what
//! decodes re-encodes to something that decodes to the same value.
#![no_main]

use libfuzzer_sys::fuzz_target;
use meshid_api::{admin, node, workload};
use prost::Message;

fn round_trip<M: Message + Default + PartialEq + std::fmt::Debug>(data: &[u8]) {
    if let Ok(m) = M::decode(data) {
        let again = M::decode(m.encode_to_vec().as_slice()).expect("re-encoded message decodes");
        assert_eq!(again, m);
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&which, data)) = data.split_first() else { return };
    match which % 8 {
        0 => round_trip::<node::AttestJoinTokenRequest>(data),
        1 => round_trip::<node::SyncUpdate>(data),
        2 => round_trip::<node::BatchSignX509Request>(data),
        3 => round_trip::<node::MintJwtSvidRequest>(data),
        4 => round_trip::<admin::CreateEntryRequest>(data),
        5 => round_trip::<admin::MintX509SvidRequest>(data),
        6 => round_trip::<workload::JwtsvidRequest>(data),
        _ => round_trip::<workload::ValidateJwtsvidRequest>(data),
    }
});
