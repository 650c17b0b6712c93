//! Who may read the console: a browser on this host (a loopback peer of a console served on
//! loopback, naming a loopback host, so that a page elsewhere cannot rebind its own name to
//! 127.0.0.1 and read it), a client presenting the unrevoked X509-SVID of one of
//! `console.admins`, or a browser holding a session opened with a login token
//! (`meshid-ca console token`). A console on another address trusts no peer for being local:
//! a proxy or port forward on the CA's host would otherwise make every caller local.
//!
//! Login tokens and sessions live only in this CA server's memory, stored as SHA-256 hashes of
//! 256 random bits, so neither a memory dump of the table nor a log line gives one away. A
//! token is single-use and short-lived; the session it opens is an HttpOnly, SameSite=Strict
//! cookie that the console's script never sees. A restart ends every session.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use spiffe::SpiffeId;

use crate::token::hash_token;

/// The session cookie's name over plain HTTP (loopback).
pub const COOKIE: &str = "meshid_console";
/// Its name over HTTPS: the `__Host-` prefix makes browsers take it only from this host, over
/// HTTPS, for every path, with no `Domain` (a sibling host cannot set or shadow it).
pub const HOST_COOKIE: &str = "__Host-meshid_console";

/// The session cookie's name for a console served over HTTPS or not.
pub fn cookie_name(https: bool) -> &'static str {
    if https {
        HOST_COOKIE
    } else {
        COOKIE
    }
}
/// Login tokens waiting at once; past it the oldest is dropped.
pub const MAX_TOKENS: usize = 64;
/// Sessions at once; past it the oldest is dropped.
pub const MAX_SESSIONS: usize = 4096;

/// How a request was admitted, or why not.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Admission {
    /// From this host.
    Loopback,
    /// A client certificate naming one of `console.admins`.
    Admin(SpiffeId),
    /// A session cookie; the session was opened with a token that this admin caller made.
    Session(Arc<str>),
    /// Refused, with the reason (logged; the caller gets 401).
    Refused(&'static str),
}

/// The connection a request came on.
#[derive(Debug, Clone)]
pub struct Peer {
    /// The remote address.
    pub addr: SocketAddr,
    /// The SPIFFE ID of a verified client certificate.
    pub client: Option<SpiffeId>,
    /// That certificate's serial (lower-case hex), to check against the revocations.
    pub client_serial: Option<String>,
}

/// Secrets by their SHA-256: each one's expiry (unix seconds) and the admin caller who made
/// the token (for a session, the token it was opened with).
type Secrets = HashMap<[u8; 32], (i64, Arc<str>)>;

/// Login tokens and sessions.
#[derive(Debug)]
pub struct Access {
    /// Loopback peers are admitted (a console served on loopback).
    trust_loopback: bool,
    admins: Vec<SpiffeId>,
    token_ttl: Duration,
    session_ttl: Duration,
    tokens: Mutex<Secrets>,
    sessions: Mutex<Secrets>,
}

/// A secret: 256 random bits, base64url, with a prefix saying what it is.
fn secret(prefix: &str) -> String {
    use base64::Engine;
    let bytes = zeroize::Zeroizing::new(rand::random::<[u8; 32]>());
    format!(
        "{prefix}{}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(*bytes)
    )
}

fn secs(d: Duration) -> i64 {
    i64::try_from(d.as_secs()).unwrap_or(i64::MAX)
}

/// Inserts `hash` expiring at `value.0`, first dropping expired ones and, when full, the one
/// expiring first.
fn insert_bounded(map: &mut Secrets, hash: [u8; 32], value: (i64, Arc<str>), now: i64, max: usize) {
    map.retain(|_, (exp, _)| *exp > now);
    while map.len() >= max {
        let Some(oldest) = map.iter().min_by_key(|(_, (exp, _))| *exp).map(|(h, _)| *h) else {
            break;
        };
        map.remove(&oldest);
    }
    map.insert(hash, value);
}

impl Access {
    /// Admits loopback peers when `trust_loopback`, `admins` by certificate; tokens and
    /// sessions last as long as given.
    pub fn new(
        trust_loopback: bool,
        admins: Vec<SpiffeId>,
        token_ttl: Duration,
        session_ttl: Duration,
    ) -> Self {
        Self {
            trust_loopback,
            admins,
            token_ttl,
            session_ttl,
            tokens: Mutex::new(HashMap::new()),
            sessions: Mutex::new(HashMap::new()),
        }
    }

    /// The session lifetime.
    pub fn session_ttl(&self) -> Duration {
        self.session_ttl
    }

    /// A new single-use login token made by admin caller `by`, valid for `ttl` (default: the
    /// configured one) from `now`: the secret, to show once, and its expiry.
    pub fn mint_token(
        &self,
        now: i64,
        ttl: Option<Duration>,
        by: &str,
    ) -> (zeroize::Zeroizing<String>, i64) {
        let token = zeroize::Zeroizing::new(secret("mcl_"));
        let until = now.saturating_add(secs(ttl.unwrap_or(self.token_ttl)));
        let by: Arc<str> = Arc::from(by.chars().take(200).collect::<String>());
        let mut tokens = self.tokens.lock().unwrap_or_else(|p| p.into_inner());
        insert_bounded(
            &mut tokens,
            hash_token(&token),
            (until, by),
            now,
            MAX_TOKENS,
        );
        (token, until)
    }

    /// Exchanges a login token for a session: the session secret (the cookie's value), its
    /// expiry, and who made the token. The token is spent either way it is presented.
    pub fn login(
        &self,
        token: &str,
        now: i64,
    ) -> Result<(zeroize::Zeroizing<String>, i64, Arc<str>), &'static str> {
        let spent = {
            let mut tokens = self.tokens.lock().unwrap_or_else(|p| p.into_inner());
            tokens.remove(&hash_token(token))
        };
        let by = match spent {
            None => return Err("unknown or already used login token"),
            Some((until, _)) if until <= now => return Err("expired login token"),
            Some((_, by)) => by,
        };
        let session = zeroize::Zeroizing::new(secret("mcs_"));
        let until = now.saturating_add(secs(self.session_ttl));
        let mut sessions = self.sessions.lock().unwrap_or_else(|p| p.into_inner());
        insert_bounded(
            &mut sessions,
            hash_token(&session),
            (until, Arc::clone(&by)),
            now,
            MAX_SESSIONS,
        );
        Ok((session, until, by))
    }

    /// Ends a session (logout).
    pub fn logout(&self, session: &str) {
        let mut sessions = self.sessions.lock().unwrap_or_else(|p| p.into_inner());
        sessions.remove(&hash_token(session));
    }

    /// Decides a request from `peer` carrying the session cookie value `session`, at `now`;
    /// `revoked` says whether the peer's client certificate is revoked.
    pub fn admit(&self, peer: &Peer, session: Option<&str>, now: i64, revoked: bool) -> Admission {
        if self.trust_loopback && peer.addr.ip().is_loopback() {
            return Admission::Loopback;
        }
        if let Some(id) = &peer.client {
            if self.admins.contains(id) && !revoked {
                return Admission::Admin(id.clone());
            }
        }
        let Some(session) = session else {
            return Admission::Refused(match (&peer.client, revoked) {
                (Some(_), true) => "client certificate revoked, and no session",
                (Some(_), false) => "client certificate not among console.admins, and no session",
                (None, _) => "no client certificate and no session",
            });
        };
        let sessions = self.sessions.lock().unwrap_or_else(|p| p.into_inner());
        match sessions.get(&hash_token(session)) {
            Some((until, by)) if *until > now => Admission::Session(Arc::clone(by)),
            Some(_) => Admission::Refused("session expired"),
            None => Admission::Refused("unknown session"),
        }
    }
}

/// The value of cookie `name` in a `Cookie` header.
pub fn cookie<'a>(header: &'a str, name: &str) -> Option<&'a str> {
    header.split(';').find_map(|kv| {
        let (k, v) = kv.trim().split_once('=')?;
        (k == name).then_some(v)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn remote(client: Option<&str>) -> Peer {
        Peer {
            addr: "198.18.0.2:5000".parse().unwrap(),
            client: client.map(|c| SpiffeId::new(c).unwrap()),
            client_serial: client.map(|_| "0a".to_owned()),
        }
    }

    fn access() -> Access {
        Access::new(
            true,
            vec![SpiffeId::new("spiffe://example.org/ops/alice").unwrap()],
            Duration::from_secs(60),
            Duration::from_secs(3600),
        )
    }

    #[test]
    fn loopback_and_admins_pass_and_strangers_are_refused_with_a_reason() {
        let a = access();
        let local = Peer {
            addr: "127.0.0.1:1".parse().unwrap(),
            client: None,
            client_serial: None,
        };
        assert_eq!(a.admit(&local, None, 0, false), Admission::Loopback);
        let v6 = Peer {
            addr: "[::1]:1".parse().unwrap(),
            client: None,
            client_serial: None,
        };
        assert_eq!(a.admit(&v6, None, 0, false), Admission::Loopback);
        // A console on another address does not trust local peers.
        let https = Access::new(
            false,
            Vec::new(),
            Duration::from_secs(1),
            Duration::from_secs(1),
        );
        assert_eq!(
            https.admit(&local, None, 0, false),
            Admission::Refused("no client certificate and no session")
        );
        // A revoked admin certificate is refused.
        assert_eq!(
            a.admit(
                &remote(Some("spiffe://example.org/ops/alice")),
                None,
                0,
                true
            ),
            Admission::Refused("client certificate revoked, and no session")
        );
        assert!(matches!(
            a.admit(
                &remote(Some("spiffe://example.org/ops/alice")),
                None,
                0,
                false
            ),
            Admission::Admin(_)
        ));
        assert_eq!(
            a.admit(&remote(Some("spiffe://example.org/web")), None, 0, false),
            Admission::Refused("client certificate not among console.admins, and no session")
        );
        assert_eq!(
            a.admit(&remote(None), None, 0, false),
            Admission::Refused("no client certificate and no session")
        );
        assert_eq!(
            a.admit(&remote(None), Some("mcs_forged"), 0, false),
            Admission::Refused("unknown session")
        );
    }

    #[test]
    fn a_token_opens_one_session_once_and_both_expire() {
        let a = access();
        let (token, until) = a.mint_token(1000, None, "admin:uid=0");
        assert_eq!(until, 1060);
        assert!(token.starts_with("mcl_") && token.len() > 40);
        let (session, expires, by) = a.login(&token, 1010).unwrap();
        assert_eq!(&*by, "admin:uid=0");
        assert_eq!(expires, 4610);
        assert_eq!(
            a.login(&token, 1011).unwrap_err(),
            "unknown or already used login token"
        );
        assert_eq!(
            a.admit(&remote(None), Some(&session), 2000, false),
            Admission::Session("admin:uid=0".into())
        );
        assert_eq!(
            a.admit(&remote(None), Some(&session), 4610, false),
            Admission::Refused("session expired")
        );
        let (late, _) = a.mint_token(1000, Some(Duration::from_secs(5)), "admin:uid=0");
        assert_eq!(a.login(&late, 1005).unwrap_err(), "expired login token");
        let (token, _) = a.mint_token(1000, None, "admin:uid=0");
        let (session, _, _) = a.login(&token, 1000).unwrap();
        a.logout(&session);
        assert_eq!(
            a.admit(&remote(None), Some(&session), 1001, false),
            Admission::Refused("unknown session")
        );
    }

    #[test]
    fn the_tables_are_bounded() {
        let a = access();
        let first = a.mint_token(0, None, "admin:uid=0").0;
        for _ in 0..MAX_TOKENS {
            a.mint_token(1, None, "admin:uid=0");
        }
        assert_eq!(a.tokens.lock().unwrap().len(), MAX_TOKENS);
        assert!(a.login(&first, 2).is_err(), "the oldest token made room");
    }

    #[test]
    fn cookies_are_read_by_name() {
        assert_eq!(
            cookie("a=1; meshid_console=mcs_x; b=2", COOKIE),
            Some("mcs_x")
        );
        assert_eq!(cookie("meshid_console_x=1", COOKIE), None);
        assert_eq!(cookie("", COOKIE), None);
    }
}
