//! Handshakes in progress on an inbound listener, bounded: past `max_handshakes`, the oldest
//! handshake still in progress is shed for the new one.
//!
//! Shedding the oldest, not refusing the newest, is what keeps a listener usable under a storm
//! of connections that never finish their handshake (half-open TCP, or clients that send their
//! ClientHello a byte a second): such connections pile up at the old end and are shed by each
//! newcomer, while a legitimate client finishes its handshake in a millisecond or two, long
//! before it becomes the oldest.
//!
//! Handshakes are also bounded per source address ([`Handshakes::turn`]): a newcomer from a
//! source that already has `max_handshakes_per_source` in progress waits for one of them to
//! end. A single-threaded proxy works through ready handshakes in turn, so a legitimate
//! caller's handshake waits behind every one that is ready before it; without this bound, one
//! source opening connections as fast as it can (64 at a time in `meshid-bench storm`) adds
//! its whole backlog to every other caller's handshake time. A waiting connection holds its
//! place among the handshakes in progress, so it can be shed like one, and its wait counts
//! toward `handshake_timeout`.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::{oneshot, OwnedSemaphorePermit, Semaphore};

/// The handshakes in progress on one listener.
#[derive(Debug)]
pub struct Handshakes {
    max: usize,
    state: Mutex<State>,
    /// The listener's "shedding" log line, at most once a second.
    pub shed_log: meshid_api::uds::admission::RateLimitedLog,
    per_source: usize,
    /// The sources with a handshake in progress or waiting; one is removed when the last of
    /// those ends, so the map holds at most one entry per connection.
    sources: Mutex<HashMap<Source, SourceState>>,
    /// The listener's "a source waits" log line, at most once a second.
    pub source_log: meshid_api::uds::admission::RateLimitedLog,
}

#[derive(Debug)]
struct SourceState {
    turns: Arc<Semaphore>,
    /// [`Turn`]s alive, waiting or holding.
    users: usize,
}

/// Where handshakes come from, for [`Handshakes::turn`]: an IPv4 address, or an IPv6 /64
/// (one host commonly holds a whole /64).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Source {
    /// An IPv4 address (also as an IPv4-mapped IPv6 address).
    V4([u8; 4]),
    /// The first 64 bits of an IPv6 address.
    V6([u8; 8]),
}

impl From<IpAddr> for Source {
    fn from(ip: IpAddr) -> Source {
        match ip.to_canonical() {
            IpAddr::V4(v4) => Source::V4(v4.octets()),
            IpAddr::V6(v6) => {
                let o = v6.octets();
                Source::V6([o[0], o[1], o[2], o[3], o[4], o[5], o[6], o[7]])
            }
        }
    }
}

#[derive(Debug, Default)]
struct State {
    next: u64,
    /// By age: the first is the oldest.
    pending: BTreeMap<u64, oneshot::Sender<()>>,
}

impl Handshakes {
    /// At most `max` (at least 1) handshakes in progress, and `per_source` (at least 1) from
    /// one source.
    pub fn new(max: usize, per_source: usize) -> Arc<Self> {
        Arc::new(Handshakes {
            max: max.max(1),
            state: Mutex::new(State::default()),
            shed_log: Default::default(),
            per_source: per_source.max(1),
            sources: Mutex::new(HashMap::new()),
            source_log: Default::default(),
        })
    }

    fn sources(&self) -> MutexGuard<'_, HashMap<Source, SourceState>> {
        self.sources
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The turn of a handshake from `source`: at once while that source has fewer than
    /// `per_source` in progress, otherwise when one of them ends (the oldest waiter first).
    /// `waited` says whether this one had to wait (to count and log it).
    pub async fn turn(self: &Arc<Self>, source: Source, waited: impl FnOnce()) -> Turn {
        let sem = {
            let mut sources = self.sources();
            let st = sources.entry(source).or_insert_with(|| SourceState {
                turns: Arc::new(Semaphore::new(self.per_source)),
                users: 0,
            });
            st.users += 1;
            Arc::clone(&st.turns)
        };
        // From here the turn is counted: if this future is dropped while it waits, the turn's
        // drop uncounts it.
        let mut turn = Turn {
            owner: Arc::clone(self),
            source,
            permit: None,
        };
        turn.permit = match Arc::clone(&sem).try_acquire_owned() {
            Ok(p) => Some(p),
            Err(_) => {
                waited();
                // `Err` only if the semaphore were closed, which it never is.
                sem.acquire_owned().await.ok()
            }
        };
        turn
    }

    /// Sources with a handshake in progress or waiting.
    pub fn sources_tracked(&self) -> usize {
        self.sources().len()
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // The state stays consistent across a panic (each change is one map operation).
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Takes a slot for a new handshake, shedding the oldest ones while the listener is at its
    /// maximum. Returns the slot and how many were shed for it.
    pub fn begin(self: &Arc<Self>) -> (Slot, usize) {
        let mut st = self.state();
        let mut shed = 0;
        while st.pending.len() >= self.max {
            let Some((_, oldest)) = st.pending.pop_first() else {
                break;
            };
            // A handshake that already ended has dropped its receiver: nothing to do.
            if oldest.send(()).is_ok() {
                shed += 1;
            }
        }
        let id = st.next;
        st.next += 1;
        let (tx, rx) = oneshot::channel();
        st.pending.insert(id, tx);
        drop(st);
        (
            Slot {
                owner: Arc::clone(self),
                id,
                shed: rx,
            },
            shed,
        )
    }

    /// Sheds the oldest handshake in progress, if any (for a new connection on a full
    /// listener). Returns whether one was shed.
    pub fn shed_oldest(&self) -> bool {
        let mut st = self.state();
        while let Some((_, oldest)) = st.pending.pop_first() {
            if oldest.send(()).is_ok() {
                return true;
            }
        }
        false
    }

    /// Handshakes in progress now.
    pub fn in_progress(&self) -> usize {
        self.state().pending.len()
    }
}

/// A handshake's turn among those of its source ([`Handshakes::turn`]); dropping it (or the
/// future waiting for it) gives the turn to the next waiter.
#[derive(Debug)]
pub struct Turn {
    owner: Arc<Handshakes>,
    source: Source,
    permit: Option<OwnedSemaphorePermit>,
}

impl Drop for Turn {
    fn drop(&mut self) {
        drop(self.permit.take());
        let mut sources = self.owner.sources();
        if let Some(st) = sources.get_mut(&self.source) {
            st.users -= 1;
            if st.users == 0 {
                sources.remove(&self.source);
            }
        }
    }
}

/// One handshake's place. Dropping it (the handshake ended, either way) frees the place.
#[derive(Debug)]
pub struct Slot {
    owner: Arc<Handshakes>,
    id: u64,
    shed: oneshot::Receiver<()>,
}

impl Slot {
    /// Completes when this handshake is shed for a newer one.
    pub async fn shed(&mut self) {
        // An error means the sender is gone without a word: only shedding removes it while
        // the slot lives, so that is a shed too.
        let _ = (&mut self.shed).await;
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.owner.state().pending.remove(&self.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_oldest_handshake_is_shed_for_a_new_one() {
        let h = Handshakes::new(2, 16);
        let (mut a, shed) = h.begin();
        assert_eq!(shed, 0);
        let (mut b, _) = h.begin();
        assert_eq!(h.in_progress(), 2);
        let (c, shed) = h.begin();
        assert_eq!(shed, 1);
        // a, the oldest, is shed; b is not.
        tokio::time::timeout(std::time::Duration::from_secs(1), a.shed())
            .await
            .expect("the oldest is shed");
        assert!(
            tokio::time::timeout(std::time::Duration::from_millis(50), b.shed())
                .await
                .is_err(),
            "the younger one is kept"
        );
        drop(a);
        assert_eq!(h.in_progress(), 2);
        // A finished handshake frees its place: no shed needed for the next.
        drop(c);
        let (_d, shed) = h.begin();
        assert_eq!(shed, 0);
        assert_eq!(h.in_progress(), 2);
        // shed_oldest: b goes; then _d; then none is left.
        assert!(h.shed_oldest());
        tokio::time::timeout(std::time::Duration::from_secs(1), b.shed())
            .await
            .expect("shed");
        assert!(h.shed_oldest());
        assert!(!h.shed_oldest());
    }

    #[tokio::test]
    async fn a_source_at_its_maximum_waits_its_turn_and_others_do_not() {
        use std::net::Ipv6Addr;
        use std::sync::atomic::{AtomicUsize, Ordering};
        use std::time::Duration;

        let h = Handshakes::new(100, 2);
        let waits = Arc::new(AtomicUsize::new(0));
        let counted = || {
            let w = waits.clone();
            move || {
                w.fetch_add(1, Ordering::SeqCst);
            }
        };
        let a: Source = "198.18.0.1".parse::<IpAddr>().unwrap().into();
        let b: Source = "198.18.0.2".parse::<IpAddr>().unwrap().into();
        let t1 = h.turn(a, counted()).await;
        let t2 = h.turn(a, counted()).await;
        assert_eq!(waits.load(Ordering::SeqCst), 0);
        // Another source is not held up by a's two.
        let other = tokio::time::timeout(Duration::from_secs(1), h.turn(b, counted()))
            .await
            .expect("another source gets its turn at once");
        assert_eq!(h.sources_tracked(), 2);
        // a's third waits, counted once, until one of a's ends.
        let third = h.turn(a, counted());
        tokio::pin!(third);
        assert!(
            tokio::time::timeout(Duration::from_millis(50), &mut third)
                .await
                .is_err(),
            "the third from a waits"
        );
        assert_eq!(waits.load(Ordering::SeqCst), 1);
        drop(t1);
        let t3 = tokio::time::timeout(Duration::from_secs(1), &mut third)
            .await
            .expect("the turn passes when one ends");
        // A waiter given up (its connection shed or timed out) leaves nothing behind.
        let fourth = h.turn(a, counted());
        assert!(tokio::time::timeout(Duration::from_millis(20), fourth)
            .await
            .is_err());
        drop((t2, t3, other));
        assert_eq!(h.sources_tracked(), 0, "every source is forgotten");
        // IPv4-mapped IPv6 is the IPv4 source; an IPv6 /64 is one source.
        let mapped: Source = "::ffff:198.18.0.1".parse::<IpAddr>().unwrap().into();
        assert_eq!(mapped, a);
        let x: Source = IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 1, 2, 3, 4, 5, 6)).into();
        let y: Source = IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 1, 2, 9, 9, 9, 9)).into();
        let z: Source = IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 1, 3, 3, 4, 5, 6)).into();
        assert_eq!(x, y);
        assert_ne!(x, z);
    }

    #[tokio::test]
    async fn a_maximum_of_zero_still_admits_one() {
        let h = Handshakes::new(0, 0);
        let (_a, _) = h.begin();
        let (_b, shed) = h.begin();
        assert_eq!(shed, 1);
        assert_eq!(h.in_progress(), 1);
    }
}
