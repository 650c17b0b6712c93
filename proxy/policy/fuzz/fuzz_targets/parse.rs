//! Arbitrary bytes as a policy: parsing never panics; a policy that parses answers `check`,
//! and `explain` agrees with `decide` (and `connection`, when decided) on fixed requests.
//!
//! Run with `cargo fuzz run parse` from `proxy/policy/fuzz`.

#![no_main]

use libfuzzer_sys::fuzz_target;
use meshid_policy::{ConnectionVerdict, HttpRequest, Policy, Request, SpiffeId};

const IDS: &[&str] = &[
    "spiffe://example.org/ns/web/frontend",
    "spiffe://example.org/ns/api/orders",
    "spiffe://example.org",
    "spiffe://partner.org/a/b/c",
];

const HTTP: &[Option<(&str, &str)>] = &[
    None,
    Some(("GET", "/v1/orders")),
    Some(("POST", "/admin/../v1")),
    Some(("get", "/")),
];

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(policy) = Policy::parse(text, "fuzz.yaml") else {
        return;
    };
    let _ = policy.check();
    let ids: Vec<SpiffeId> = IDS.iter().filter_map(|s| SpiffeId::new(s).ok()).collect();
    for from in &ids {
        for to in &ids {
            for port in [None, Some(8080u16)] {
                let verdict = port.map(|p| policy.connection(from, to, p));
                for http in HTTP {
                    let req = Request {
                        from,
                        to,
                        port,
                        http: http.map(|(method, path)| HttpRequest { method, path, upgrade: None }),
                    };
                    let decision = policy.decide(&req);
                    assert_eq!(policy.explain(&req).decision, decision);
                    if let Some(ConnectionVerdict::Decided(d)) = &verdict {
                        assert_eq!(d, &decision);
                    }
                }
            }
            let _ = policy.who_can(to);
        }
    }
});
