//! Bounds on what one caller may ask of the agent or the CA, shared by both: the audience of a
//! JWT-SVID request, and a per-caller rate of work.
//!
//! A JWT-SVID carries its audiences in the token, the agent caches tokens and the CA records
//! each mint in its audit log, which cannot be pruned without breaking the chain. Unbounded
//! audiences therefore let any workload with any identity grow the agent's memory and the CA's
//! database at will (40 calls of 2,500 audiences of 1,000 bytes grew the CA's database by
//! 101 MiB). [`Audience`] is the one parser of a requested audience; a value in hand is within
//! [`MAX_AUDIENCES`] × [`MAX_AUDIENCE_LEN`]. [`RateLimiter`] bounds how often one caller may
//! make a component do expensive work (mint, sign, hash).

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Audience values a JWT-SVID request may carry.
pub const MAX_AUDIENCES: usize = 16;

/// Octets one audience value may have.
pub const MAX_AUDIENCE_LEN: usize = 256;

/// Why a requested audience is refused. Messages name counts and lengths, never the values.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum AudienceError {
    /// No audience at all.
    #[error("audience must be specified")]
    Missing,
    /// One of the values is empty.
    #[error("audience value {index} is empty")]
    EmptyValue {
        /// Its position in the request (from 0).
        index: usize,
    },
    /// More values than [`MAX_AUDIENCES`].
    #[error("{count} audience values; at most {MAX_AUDIENCES} are allowed")]
    TooMany {
        /// How many were sent.
        count: usize,
    },
    /// A value longer than [`MAX_AUDIENCE_LEN`].
    #[error("audience value {index} has {len} bytes; at most {MAX_AUDIENCE_LEN} are allowed")]
    TooLong {
        /// Its position in the request (from 0).
        index: usize,
        /// Its length in octets.
        len: usize,
    },
}

/// The audience of a JWT-SVID: 1 to [`MAX_AUDIENCES`] distinct, non-empty values of at most
/// [`MAX_AUDIENCE_LEN`] octets, in the order first given.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Audience(Vec<String>);

impl Audience {
    /// Checks a requested audience (repeated values count once in the result, but every value
    /// sent counts against the bounds).
    pub fn parse(values: &[String]) -> Result<Self, AudienceError> {
        if values.is_empty() {
            return Err(AudienceError::Missing);
        }
        if values.len() > MAX_AUDIENCES {
            return Err(AudienceError::TooMany {
                count: values.len(),
            });
        }
        let mut out: Vec<String> = Vec::with_capacity(values.len());
        for (index, v) in values.iter().enumerate() {
            if v.is_empty() {
                return Err(AudienceError::EmptyValue { index });
            }
            if v.len() > MAX_AUDIENCE_LEN {
                return Err(AudienceError::TooLong {
                    index,
                    len: v.len(),
                });
            }
            if !out.contains(v) {
                out.push(v.clone());
            }
        }
        Ok(Self(out))
    }

    /// The values, in the order first given.
    pub fn values(&self) -> &[String] {
        &self.0
    }

    /// The values sorted: the same audience, whatever the order it was asked in.
    pub fn sorted(&self) -> Vec<String> {
        let mut v = self.0.clone();
        v.sort();
        v
    }
}

/// A token bucket per caller: `burst` operations at once, refilled at `per_second`. Buckets
/// that are full again are forgotten, so memory follows the callers active within the last
/// `burst / per_second` seconds.
#[derive(Debug)]
pub struct RateLimiter<K> {
    per_second: f64,
    burst: f64,
    buckets: Mutex<HashMap<K, (f64, Instant)>>,
}

impl<K: Hash + Eq + Clone> RateLimiter<K> {
    /// A limiter allowing `burst` operations at once and `per_second` on average per caller.
    pub fn new(per_second: u32, burst: u32) -> Self {
        Self {
            per_second: f64::from(per_second.max(1)),
            burst: f64::from(burst.max(1)),
            buckets: Mutex::new(HashMap::new()),
        }
    }

    /// Takes one operation for `caller` at `now`: `Ok`, or `Err` with how long until one is
    /// available.
    pub fn take(&self, caller: &K, now: Instant) -> Result<(), Duration> {
        let mut buckets = self
            .buckets
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if buckets.len() > 4096 {
            let (rate, burst) = (self.per_second, self.burst);
            buckets.retain(|_, (tokens, at)| {
                *tokens + now.saturating_duration_since(*at).as_secs_f64() * rate < burst
            });
        }
        let (tokens, at) = buckets.entry(caller.clone()).or_insert((self.burst, now));
        let refilled = (*tokens
            + now.saturating_duration_since(*at).as_secs_f64() * self.per_second)
            .min(self.burst);
        *at = now;
        if refilled >= 1.0 {
            *tokens = refilled - 1.0;
            Ok(())
        } else {
            *tokens = refilled;
            Err(Duration::from_secs_f64((1.0 - refilled) / self.per_second))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|x| (*x).to_owned()).collect()
    }

    #[test]
    fn audiences_within_bounds_parse_deduplicated_in_order() {
        let a = Audience::parse(&s(&["b", "a", "b"])).unwrap();
        assert_eq!(a.values(), &s(&["b", "a"]));
        assert_eq!(a.sorted(), s(&["a", "b"]));
        let max: Vec<String> = (0..MAX_AUDIENCES)
            .map(|i| format!("{i:0>width$}", width = MAX_AUDIENCE_LEN))
            .collect();
        assert_eq!(Audience::parse(&max).unwrap().values().len(), MAX_AUDIENCES);
    }

    #[test]
    fn audiences_out_of_bounds_are_refused_without_quoting_them() {
        let long = "x".repeat(MAX_AUDIENCE_LEN + 1);
        let cases: Vec<(Vec<String>, AudienceError)> = vec![
            (vec![], AudienceError::Missing),
            (s(&["a", ""]), AudienceError::EmptyValue { index: 1 }),
            (
                vec!["a".to_owned(); MAX_AUDIENCES + 1],
                AudienceError::TooMany {
                    count: MAX_AUDIENCES + 1,
                },
            ),
            (
                vec!["a".to_owned(), long.clone()],
                AudienceError::TooLong {
                    index: 1,
                    len: MAX_AUDIENCE_LEN + 1,
                },
            ),
            (
                vec!["y".repeat(1000); 2500],
                AudienceError::TooMany { count: 2500 },
            ),
        ];
        for (values, error) in cases {
            let got = Audience::parse(&values).unwrap_err();
            assert_eq!(got, error);
            assert!(!got.to_string().contains("xxx") && !got.to_string().contains("yyy"));
        }
    }

    #[test]
    fn rate_limiter_allows_a_burst_then_the_rate_per_caller() {
        let limiter = RateLimiter::new(10, 5);
        let t0 = Instant::now();
        for _ in 0..5 {
            assert!(limiter.take(&1u32, t0).is_ok());
        }
        let wait = limiter.take(&1, t0).unwrap_err();
        assert!(wait <= Duration::from_millis(100), "{wait:?}");
        // Another caller has its own bucket.
        assert!(limiter.take(&2, t0).is_ok());
        // 100 ms later one more is available, not two.
        let t1 = t0 + Duration::from_millis(100);
        assert!(limiter.take(&1, t1).is_ok());
        assert!(limiter.take(&1, t1).is_err());
        // After a long pause, a full burst again.
        let t2 = t1 + Duration::from_secs(10);
        for _ in 0..5 {
            assert!(limiter.take(&1, t2).is_ok());
        }
        assert!(limiter.take(&1, t2).is_err());
    }
}
