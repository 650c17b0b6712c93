//! Arbitrary bytes as two policy documents (split at the first NUL), merged as the CA merges
//! its named documents (`Policy::merge`): never a panic; a merge that succeeds holds every
//! rule of both, `explain` agrees with `decide`, and a document merged alone decides as itself.
//! A document written back (`to_yaml`, as the agent hands policy to a proxy) parses and decides
//! the same, and so does its part restricted to a callee, for traffic to that callee.
//!
//! Run with `cargo fuzz run merge` from `proxy/policy/fuzz`.

#![no_main]

use libfuzzer_sys::fuzz_target;
use meshid_policy::{HttpRequest, Policy, Request, SpiffeId};

const IDS: &[&str] = &[
    "spiffe://example.org/ns/web/frontend",
    "spiffe://example.org/ns/api/orders",
    "spiffe://partner.org/a/b/c",
];

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let (a, b) = text.split_once('\0').unwrap_or((text, ""));
    let Ok(a) = Policy::parse(a, "a.yaml") else {
        return;
    };
    let alone = Policy::merge("mesh", std::slice::from_ref(&a)).expect("one document merges");
    let both = Policy::parse(b, "b.yaml")
        .ok()
        .and_then(|b| Policy::merge("mesh", &[a.clone(), b.clone()]).ok().map(|m| (b, m)));
    if let Some((b, merged)) = &both {
        assert_eq!(merged.rule_count(), a.rule_count() + b.rule_count());
    }
    let yaml = a.to_yaml();
    let back = Policy::parse(&yaml, "back.yaml").unwrap_or_else(|e| panic!("{e}\n{yaml}"));
    let ids: Vec<SpiffeId> = IDS.iter().filter_map(|s| SpiffeId::new(s).ok()).collect();
    for from in &ids {
        for to in &ids {
            for http in [None, Some(("GET", "/v1/orders"))] {
                let req = Request {
                    from,
                    to,
                    port: Some(8080),
                    http: http.map(|(method, path)| HttpRequest { method, path, upgrade: None }),
                };
                assert_eq!(alone.decide(&req), a.decide(&req));
                let (x, y) = (a.decide(&req), back.decide(&req));
                assert_eq!(x.outcome, y.outcome);
                assert_eq!(x.rule.map(|r| r.name), y.rule.map(|r| r.name));
                let part = a.restricted_to(std::slice::from_ref(to));
                let z = part.decide(&req);
                assert_eq!(a.decide(&req).outcome, z.outcome);
                if let Some((_, merged)) = &both {
                    assert_eq!(merged.explain(&req).decision, merged.decide(&req));
                }
            }
        }
    }
});
