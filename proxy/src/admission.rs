//! Handshakes in progress on an inbound listener, bounded: past `max_handshakes`, the oldest
//! handshake still in progress is shed for the new one.
//!
//! Shedding the oldest, not refusing the newest, is what keeps a listener usable under a storm
//! of connections that never finish their handshake (half-open TCP, or clients that send their
//! ClientHello a byte a second): such connections pile up at the old end and are shed by each
//! newcomer, while a legitimate client finishes its handshake in a millisecond or two, long
//! before it becomes the oldest.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::oneshot;

/// The handshakes in progress on one listener.
#[derive(Debug)]
pub struct Handshakes {
    max: usize,
    state: Mutex<State>,
    /// The listener's "shedding" log line, at most once a second.
    pub shed_log: meshid_api::uds::admission::RateLimitedLog,
}

#[derive(Debug, Default)]
struct State {
    next: u64,
    /// By age: the first is the oldest.
    pending: BTreeMap<u64, oneshot::Sender<()>>,
}

impl Handshakes {
    /// At most `max` (at least 1) handshakes in progress.
    pub fn new(max: usize) -> Arc<Self> {
        Arc::new(Handshakes {
            max: max.max(1),
            state: Mutex::new(State::default()),
            shed_log: Default::default(),
        })
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
        let h = Handshakes::new(2);
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
    async fn a_maximum_of_zero_still_admits_one() {
        let h = Handshakes::new(0);
        let (_a, _) = h.begin();
        let (_b, shed) = h.begin();
        assert_eq!(shed, 1);
        assert_eq!(h.in_progress(), 1);
    }
}
