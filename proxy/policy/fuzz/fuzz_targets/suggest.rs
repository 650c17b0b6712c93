//! Arbitrary bytes as an access log (JSON lines; lines that are not records are skipped, as
//! `policy suggest --skip-invalid` does), the first byte choosing the widening: never a panic;
//! the suggestion's text parses back, replaying every record it used gives zero denials, and
//! each rule is the only one to match some used record (so that without it, that record is
//! denied: the suggestion's only rules are allows under a default deny).
//!
//! Run with `cargo fuzz run suggest -- -dict=suggest.dict` from `proxy/policy/fuzz`.

#![no_main]

use libfuzzer_sys::fuzz_target;
use meshid_policy::{
    parse_access_log, AccessRecord, Action, HttpRequest, Policy, PolicyError, Request, Skip,
    SpiffeId, SuggestOptions,
};

/// The indexes of the rules that match the recorded traffic, from `explain`.
fn matching(policy: &Policy, r: &AccessRecord) -> Vec<usize> {
    let id = |s: &Option<String>| SpiffeId::new(s.as_deref().unwrap_or_default()).ok();
    let (Some(from), Some(to)) = (id(&r.caller), id(&r.callee)) else {
        panic!("a used record has a caller and a callee: {r:?}");
    };
    let http = r
        .method
        .as_deref()
        .zip(r.path.as_deref())
        .map(|(method, path)| HttpRequest {
            method,
            path,
            upgrade: r.upgrade.as_deref(),
        });
    let req = Request {
        from: &from,
        to: &to,
        port: r.port,
        http,
    };
    let e = policy.explain(&req);
    assert_eq!(e.decision, policy.decide(&req));
    e.rules
        .iter()
        .filter(|t| t.result.matched())
        .map(|t| t.rule.index)
        .collect()
}

fuzz_target!(|data: &[u8]| {
    let Some((&first, rest)) = data.split_first() else {
        return;
    };
    let text = String::from_utf8_lossy(rest);
    let records: Vec<AccessRecord> = parse_access_log(&text, "fuzz.log")
        .filter_map(Result::ok)
        .collect();
    let options = SuggestOptions {
        widen_min: usize::from(first % 4),
        ..SuggestOptions::default()
    };
    let s = match Policy::suggest(&records, &options) {
        Ok(s) => s,
        Err(PolicyError::TooLarge { .. }) => return,
        Err(e) => panic!("{e}"),
    };
    let back = Policy::parse(&s.yaml, "back.yaml").unwrap_or_else(|e| panic!("{e}\n{}", s.yaml));
    assert_eq!(back.rule_count(), s.policy.rule_count());
    assert_eq!(back.default_action(), Action::Deny);
    let used: Vec<&AccessRecord> = records.iter().filter(|r| Skip::of(r).is_none()).collect();
    assert_eq!(used.len(), s.used);
    let mut sole = vec![false; back.rule_count()];
    for r in &used {
        let d = r.replay(&back).expect("a used record replays");
        assert!(d.outcome.allowed(), "{r:?} denied under\n{}", s.yaml);
        if let [only] = matching(&back, r)[..] {
            sole[only] = true;
        }
    }
    if let Some(i) = sole.iter().position(|s| !s) {
        panic!(
            "rule {i} is not needed: no used record matches it alone\n{}",
            s.yaml
        );
    }
});
