//! Certificate revocation lists as the proxy and the agent take them from the sync stream and
//! the Workload API (`Revocations::from_der`): any bytes parse or are refused with the CRL's
//! position, never a panic; a set that parses answers lookups consistently.
#![no_main]

use libfuzzer_sys::fuzz_target;
use meshid_api::tls::revocation::Revocations;
use rustls_pki_types::CertificateDer;

fuzz_target!(|data: &[u8]| {
    // The first byte splits the input into up to two CRLs, as a sync message may carry several.
    let Some((&split, data)) = data.split_first() else { return };
    let at = (split as usize).min(data.len());
    let crls: Vec<Vec<u8>> = if split == 0 {
        vec![data.to_vec()]
    } else {
        vec![data[..at].to_vec(), data[at..].to_vec()]
    };
    match Revocations::from_der(&crls) {
        Ok(set) => {
            assert_eq!(set.der().len(), crls.len());
            assert_eq!(set.is_empty(), crls.is_empty());
            // A lookup on whatever certificate the bytes make does not panic.
            let chain = [CertificateDer::from(data.to_vec())];
            let _ = set.revoked_in(&chain);
        }
        Err(e) => assert!(e.index < crls.len(), "{e}"),
    }
});
