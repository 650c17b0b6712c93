//! Selector and entry validation never panics; a valid entry survives a round trip through its
//! spec and its selectors through their text.
#![no_main]

use libfuzzer_sys::fuzz_target;
use meshid_ca::entry::{EntrySpec, Selector};
use spiffe::TrustDomain;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    if let Ok(sel) = Selector::parse(text) {
        assert_eq!(Selector::parse(&sel.to_string()).unwrap(), sel);
    }
    let mut parts = text.split('\n');
    let spec = EntrySpec {
        spiffe_id: parts.next().unwrap_or_default().to_owned(),
        parent_id: parts.next().unwrap_or_default().to_owned(),
        selectors: parts.next().map(|s| s.split(',').map(str::to_owned).collect()).unwrap_or_default(),
        dns_names: parts.next().map(|s| s.split(',').map(str::to_owned).collect()).unwrap_or_default(),
        federates_with: parts.next().map(|s| s.split(',').map(str::to_owned).collect()).unwrap_or_default(),
        hint: parts.next().unwrap_or_default().to_owned(),
        ..Default::default()
    };
    let td = TrustDomain::new("example.org").unwrap();
    if let Ok(entry) = spec.validate(&td, 0) {
        let again = EntrySpec::from(&entry).validate(&td, 0).expect("valid entries stay valid");
        assert_eq!(again, entry);
    }
});
