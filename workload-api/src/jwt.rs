//! The agent's JWT-SVIDs: the cache of minted tokens (so a workload asking again gets the same
//! token until half its lifetime has passed, and the CA is not asked per call), and the
//! validation behind ValidateJWTSVID, done with the `spiffe` crate's validator (the one meshid
//! has; the CA mints, it does not validate).

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;

use spiffe::{JwtBundle, JwtBundleSet, JwtSvid, SpiffeId, TrustDomain};
use zeroize::Zeroizing;

/// JWT-SVIDs cached at most (entry, audience pairs).
const JWT_CACHE_CAPACITY: usize = 1000;

/// Octets of tokens (and their keys) cached at most.
const JWT_CACHE_MAX_BYTES: usize = 4 << 20;

/// The JWK `use` of JWT authorities.
const JWT_SVID_USE: &str = "jwt-svid";

/// Why a JWT-SVID was not validated.
#[derive(Debug)]
pub(crate) enum Invalid {
    /// The trust domain's JWT authorities cannot be used.
    Bundle(String),
    /// The token is not a valid JWT-SVID for the audience.
    Token(String),
}

/// Validates `token` for `audience` against the JWT authorities `jwks` (a JWKS document, see
/// [`jwt_svid_jwks`]) of `trust_domain`: its SPIFFE ID and its claims.
pub(crate) fn validate(
    token: &str,
    trust_domain: &TrustDomain,
    jwks: &[u8],
    federated: &[(TrustDomain, Vec<u8>)],
    audience: &str,
) -> Result<(SpiffeId, prost_types::Struct), Invalid> {
    let bundle = JwtBundle::from_jwt_authorities(trust_domain.clone(), jwks)
        .map_err(|e| Invalid::Bundle(error_chain(&e)))?;
    let mut bundles = JwtBundleSet::new();
    bundles.add_bundle(bundle);
    // A token of a federated trust domain is checked with that domain's keys; one whose keys
    // do not parse is left out (its tokens are then refused as of an unknown trust domain).
    for (td, jwks) in federated {
        match JwtBundle::from_jwt_authorities(td.clone(), jwks) {
            Ok(b) => bundles.add_bundle(b),
            Err(e) => {
                tracing::warn!(trust_domain = %td, error = %error_chain(&e), "a federated JWT bundle does not parse")
            }
        }
    }
    let svid = JwtSvid::parse_and_validate(token, &bundles, &[audience])
        .map_err(|e| Invalid::Token(error_chain(&e)))?;
    Ok((svid.spiffe_id().clone(), claims_struct(svid.token())?))
}

/// Filters a JWKS document down to the keys a JWT-SVID validator may use.
pub(crate) fn jwt_svid_jwks(json: &str) -> Vec<u8> {
    let keys: Vec<serde_json::Value> = if json.trim().is_empty() {
        Vec::new()
    } else {
        match serde_json::from_str::<serde_json::Value>(json) {
            Ok(mut doc) => match doc.get_mut("keys").map(serde_json::Value::take) {
                Some(serde_json::Value::Array(keys)) => keys
                    .into_iter()
                    .filter(|k| {
                        k.get("use").and_then(serde_json::Value::as_str) == Some(JWT_SVID_USE)
                            && k.get("kid")
                                .and_then(serde_json::Value::as_str)
                                .is_some_and(|kid| !kid.is_empty())
                    })
                    .collect(),
                _ => {
                    tracing::warn!("JWT authorities document has no keys array");
                    Vec::new()
                }
            },
            Err(error) => {
                tracing::warn!(%error, "JWT authorities document is not JSON");
                Vec::new()
            }
        }
    };
    let doc = serde_json::json!({ "keys": keys });
    serde_json::to_vec(&doc).unwrap_or_else(|_| br#"{"keys":[]}"#.to_vec())
}

/// Cache key of a minted JWT-SVID.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct JwtKey {
    pub(crate) entry_id: String,
    pub(crate) revision: i64,
    /// Sorted, deduplicated.
    pub(crate) audience: Vec<String>,
}

struct CachedJwt {
    token: Zeroizing<String>,
    minted_at: i64,
    expiry: i64,
}

impl CachedJwt {
    /// Fresh until half its lifetime has passed.
    fn fresh(&self, now: i64) -> bool {
        let half_life = self.expiry.saturating_sub(self.minted_at) / 2;
        now < self.minted_at.saturating_add(half_life)
    }
}

/// Minted JWT-SVIDs, bounded by count ([`JWT_CACHE_CAPACITY`]) and by the octets of their keys
/// and tokens ([`JWT_CACHE_MAX_BYTES`]).
#[derive(Default)]
pub(crate) struct JwtCache {
    map: Mutex<CacheMap>,
}

#[derive(Default)]
struct CacheMap {
    entries: HashMap<JwtKey, CachedJwt>,
    bytes: usize,
}

impl CacheMap {
    fn retain(&mut self, keep: impl Fn(&CachedJwt) -> bool) {
        self.entries.retain(|_, c| keep(c));
        self.bytes = self.entries.iter().map(|(k, c)| cost(k, c)).sum();
    }
}

/// What an entry of the cache holds, in octets (near enough).
fn cost(key: &JwtKey, cached: &CachedJwt) -> usize {
    key.entry_id.len() + key.audience.iter().map(String::len).sum::<usize>() + cached.token.len()
}

impl JwtCache {
    fn lock(&self) -> std::sync::MutexGuard<'_, CacheMap> {
        // A panic while holding the lock cannot leave the map inconsistent.
        self.map
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    pub(crate) fn get(&self, key: &JwtKey, now: i64) -> Option<Zeroizing<String>> {
        self.lock()
            .entries
            .get(key)
            .filter(|c| c.fresh(now))
            .map(|c| Zeroizing::clone(&c.token))
    }

    pub(crate) fn put(&self, key: JwtKey, token: Zeroizing<String>, now: i64, expiry: i64) {
        let cached = CachedJwt {
            token,
            minted_at: now,
            expiry,
        };
        let size = cost(&key, &cached);
        if size > JWT_CACHE_MAX_BYTES {
            return;
        }
        let mut map = self.lock();
        if let Some(old) = map.entries.remove(&key) {
            map.bytes -= cost(&key, &old);
        }
        let full = |m: &CacheMap| {
            m.entries.len() >= JWT_CACHE_CAPACITY || m.bytes + size > JWT_CACHE_MAX_BYTES
        };
        if full(&map) {
            map.retain(|c| c.fresh(now));
            if full(&map) {
                map.entries.clear();
                map.bytes = 0;
            }
        }
        map.bytes += size;
        map.entries.insert(key, cached);
    }
}

/// An error and its sources, `a: b: c`.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(inner) = source {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        source = inner.source();
    }
    s
}

/// The claims of an (already validated) JWT as a protobuf `Struct`; numbers become doubles.
fn claims_struct(token: &str) -> Result<prost_types::Struct, Invalid> {
    use base64::Engine as _;
    let bad = |what: &str| Invalid::Token(format!("cannot read claims: {what}"));
    let payload = token.split('.').nth(1).ok_or_else(|| bad("no payload"))?;
    let json = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload)
        .map_err(|_| bad("invalid base64url"))?;
    let claims: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(&json).map_err(|_| bad("not a JSON object"))?;
    Ok(prost_types::Struct {
        fields: claims
            .into_iter()
            .map(|(k, v)| (k, to_proto_value(v)))
            .collect::<BTreeMap<_, _>>(),
    })
}

fn to_proto_value(v: serde_json::Value) -> prost_types::Value {
    use prost_types::value::Kind;
    use serde_json::Value as J;
    let kind = match v {
        J::Null => Kind::NullValue(prost_types::NullValue::NullValue.into()),
        J::Bool(b) => Kind::BoolValue(b),
        J::Number(n) => Kind::NumberValue(n.as_f64().unwrap_or(f64::NAN)),
        J::String(s) => Kind::StringValue(s),
        J::Array(items) => Kind::ListValue(prost_types::ListValue {
            values: items.into_iter().map(to_proto_value).collect(),
        }),
        J::Object(map) => Kind::StructValue(prost_types::Struct {
            fields: map
                .into_iter()
                .map(|(k, v)| (k, to_proto_value(v)))
                .collect(),
        }),
    };
    prost_types::Value { kind: Some(kind) }
}

#[cfg(test)]
mod tests;
