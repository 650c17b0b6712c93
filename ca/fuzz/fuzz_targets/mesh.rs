//! Mesh file reading (`meshid-ca apply -f`) never panics, and agrees with the CA:
//! - an error is positioned inside the file;
//! - a file that reads has no secret-looking line (comments included) and no entry declared
//!   twice;
//! - every entry read passes the CA's own validation (`EntrySpec::check_writable` and
//!   `validate`) in its SPIFFE ID's trust domain, but for what only the CA can judge: a
//!   parent or federation in another trust domain, and the admin flag it does not enforce yet;
//! - federation relationships are declared once each, with a known profile and a trust domain
//!   as the CA writes it.
#![no_main]

use std::collections::HashSet;

use libfuzzer_sys::fuzz_target;
use meshid_ca::entry::EntryError;
use meshid_ca::mesh::{looks_secret, parse, MeshError};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match parse(text, "fuzz.yaml") {
        Err(MeshError::Invalid { line, column, .. }) => {
            // YAML ends a line at `\n`, `\r\n` or a lone `\r`.
            let lines = text.matches('\n').count() + text.matches('\r').count()
                - text.matches("\r\n").count();
            assert!(line >= 1 && line <= lines + 1, "line {line} of {lines}");
            assert!(column >= 1, "column {column}");
        }
        Err(e) => panic!("parse gave a non-positioned error: {e}"),
        Ok(mesh) => {
            assert!(
                text.split(['\n', '\r']).all(|l| looks_secret(l).is_none()),
                "a secret-looking line was accepted"
            );
            let mut seen = HashSet::new();
            for e in &mesh.entries {
                assert!(seen.insert(e.identity()), "{} declared twice", e.at);
                let td = spiffe::SpiffeId::new(&e.spec.spiffe_id)
                    .expect("the spiffe_id was checked")
                    .trust_domain()
                    .clone();
                let checked = e
                    .spec
                    .check_writable(&td)
                    .and_then(|()| e.spec.validate(&td, 0).map(drop));
                match checked {
                    Ok(()) => {}
                    Err(EntryError::ForeignTrustDomain {
                        field: "parent_id", ..
                    }) => {}
                    Err(EntryError::InvalidFederation { ref reason, .. })
                        if reason.contains("own trust domain") => {}
                    Err(EntryError::AdminNotEnforced) if e.spec.admin => {}
                    Err(other) => panic!("{}: read, but the CA refuses it: {other}", e.at),
                }
            }
            let tds: HashSet<&str> = mesh
                .federations
                .iter()
                .map(|f| f.trust_domain.as_str())
                .collect();
            assert_eq!(tds.len(), mesh.federations.len(), "a federation declared twice");
            for f in &mesh.federations {
                assert!(matches!(f.profile.as_str(), "https_web" | "https_spiffe"));
                let td = spiffe::TrustDomain::new(&f.trust_domain).expect("checked");
                assert_eq!(td.as_str(), f.trust_domain);
            }
            let names: HashSet<&str> = mesh.policies.iter().map(|p| p.name.as_str()).collect();
            assert_eq!(
                names.len(),
                mesh.policies.len(),
                "a document declared twice"
            );
        }
    }
});
