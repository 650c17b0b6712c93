//! The audience parser (`meshid_api::limits::Audience`): never panics; what it accepts is
//! within the bounds, distinct, and taken from the request in order; what it refuses is
//! explained without quoting the values.
#![no_main]

use libfuzzer_sys::fuzz_target;
use meshid_api::limits::{Audience, MAX_AUDIENCES, MAX_AUDIENCE_LEN};

fuzz_target!(|values: Vec<String>| {
    match Audience::parse(&values) {
        Ok(audience) => {
            let got = audience.values();
            assert!(!got.is_empty() && got.len() <= MAX_AUDIENCES);
            assert!(values.len() <= MAX_AUDIENCES);
            for (i, v) in got.iter().enumerate() {
                assert!(!v.is_empty() && v.len() <= MAX_AUDIENCE_LEN);
                assert!(!got[..i].contains(v), "repeated value");
            }
            // In the order first given.
            let mut firsts: Vec<&String> = Vec::new();
            for v in &values {
                if !firsts.contains(&v) {
                    firsts.push(v);
                }
            }
            assert_eq!(firsts, got.iter().collect::<Vec<_>>());
        }
        Err(error) => {
            // Only counts and lengths vary: without its digits, the message is one of the
            // fixed texts, so no value can be in it.
            let shape: String = error.to_string().chars().filter(|c| !c.is_ascii_digit()).collect();
            let known = [
                "audience must be specified",
                "audience value  is empty",
                " audience values; at most  are allowed",
                "audience value  has  bytes; at most  are allowed",
            ];
            assert!(known.contains(&shape.as_str()), "unexpected message {shape:?}");
        }
    }
});
