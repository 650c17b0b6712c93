//! What the workloads have been handed: for every open X.509 stream of the Workload API
//! (FetchX509SVID, FetchX509Bundles), the highest bundle sequence and CRL generation it has
//! handed over; for every open policy stream (meshid's `PolicyDelivery.Watch`, which proxies
//! follow), the highest policy revision.
//!
//! A message counts as handed over once the transport has taken it and asks the stream for the
//! next one; a message produced but not yet taken (a stream still sending) does not count. The
//! lowest value over the open streams is what every workload with a stream has: what the agent
//! can tell the CA before a new root is activated, and how the CA measures when a revocation or
//! a policy revision reached every workload.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

/// What an X.509 message carries: the bundle's sequence (the CA's), and the generation of the
/// CRL set (this agent's count of the sets it received; they come with no number of their own).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Handed {
    /// Bundle sequence.
    pub bundle: u64,
    /// CRL set generation.
    pub crls: u64,
}

/// What a tracked stream's message carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Carried {
    /// An X.509 message.
    X509(Handed),
    /// A policy message: the revision.
    Policy(u64),
}

impl Carried {
    /// The same kind of stream, having handed over nothing yet.
    fn nothing(self) -> Self {
        match self {
            Self::X509(_) => Self::X509(Handed::default()),
            Self::Policy(_) => Self::Policy(0),
        }
    }

    /// The highest of both (each field apart); `self` when the kinds differ.
    fn max(self, other: Self) -> Self {
        match (self, other) {
            (Self::X509(a), Self::X509(b)) => Self::X509(Handed {
                bundle: a.bundle.max(b.bundle),
                crls: a.crls.max(b.crls),
            }),
            (Self::Policy(a), Self::Policy(b)) => Self::Policy(a.max(b)),
            (kept, _) => kept,
        }
    }
}

/// The open streams and what each has handed over.
#[derive(Debug, Default)]
pub struct Delivery {
    streams: Mutex<HashMap<u64, Carried>>,
    next_id: AtomicU64,
}

impl Delivery {
    fn lock(&self) -> MutexGuard<'_, HashMap<u64, Carried>> {
        // A panic while holding the lock cannot leave the map inconsistent.
        self.streams
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Registers a new stream of the kind of `first` (what it is about to hand over first),
    /// which has handed over nothing yet.
    pub fn open(self: &Arc<Self>, first: Carried) -> StreamTicket {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        self.lock().insert(id, first.nothing());
        StreamTicket {
            delivery: Arc::clone(self),
            id,
        }
    }

    /// The lowest bundle sequence and the lowest CRL generation handed over by the open X.509
    /// streams (each taken separately; 0 for a stream that has handed over nothing yet); `None`
    /// when no X.509 stream is open.
    pub fn delivered(&self) -> Option<Handed> {
        let streams = self.lock();
        let x509 = || {
            streams.values().filter_map(|c| match c {
                Carried::X509(h) => Some(h),
                Carried::Policy(_) => None,
            })
        };
        let bundle = x509().map(|h| h.bundle).min()?;
        let crls = x509().map(|h| h.crls).min()?;
        Some(Handed { bundle, crls })
    }

    /// The lowest policy revision handed over by the open policy streams; `None` when none is
    /// open.
    pub fn policy_delivered(&self) -> Option<u64> {
        self.lock()
            .values()
            .filter_map(|c| match c {
                Carried::Policy(r) => Some(*r),
                Carried::X509(_) => None,
            })
            .min()
    }

    /// How many X.509 streams are open.
    pub fn open_streams(&self) -> usize {
        self.lock()
            .values()
            .filter(|c| matches!(c, Carried::X509(_)))
            .count()
    }
}

/// One open stream's place in [`Delivery`]; dropped with the stream.
#[derive(Debug)]
pub struct StreamTicket {
    delivery: Arc<Delivery>,
    id: u64,
}

impl StreamTicket {
    /// The stream handed over a message carrying `what`.
    pub fn handed(&self, what: Carried) {
        if let Some(s) = self.delivery.lock().get_mut(&self.id) {
            *s = s.max(what);
        }
    }
}

impl Drop for StreamTicket {
    fn drop(&mut self) {
        self.delivery.lock().remove(&self.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_lowest_open_stream_decides() {
        let h = |bundle, crls| Carried::X509(Handed { bundle, crls });
        let bundle = |d: &Delivery| d.delivered().map(|h| h.bundle);
        let d = Arc::new(Delivery::default());
        assert_eq!(d.delivered(), None);
        let a = d.open(h(0, 0));
        let b = d.open(h(0, 0));
        assert_eq!(bundle(&d), Some(0), "nothing handed over yet");
        a.handed(h(5, 0));
        assert_eq!(bundle(&d), Some(0), "b is still behind");
        b.handed(h(4, 0));
        assert_eq!(bundle(&d), Some(4));
        b.handed(h(3, 0));
        assert_eq!(bundle(&d), Some(4), "never goes back");
        drop(b);
        assert_eq!(bundle(&d), Some(5));
        assert_eq!(d.open_streams(), 1);
        drop(a);
        assert_eq!(d.delivered(), None);
    }

    #[test]
    fn crl_generations_are_counted_apart_from_bundles() {
        let h = |bundle, crls| Carried::X509(Handed { bundle, crls });
        let d = Arc::new(Delivery::default());
        let a = d.open(h(0, 0));
        let b = d.open(h(0, 0));
        a.handed(h(7, 1));
        b.handed(h(9, 3));
        assert_eq!(d.delivered(), Some(Handed { bundle: 7, crls: 1 }));
        a.handed(h(7, 3));
        assert_eq!(d.delivered(), Some(Handed { bundle: 7, crls: 3 }));
        a.handed(h(9, 2));
        assert_eq!(
            d.delivered(),
            Some(Handed { bundle: 9, crls: 3 }),
            "never goes back"
        );
    }

    #[test]
    fn policy_streams_are_counted_apart_from_x509_streams() {
        let d = Arc::new(Delivery::default());
        let x = d.open(Carried::X509(Handed::default()));
        let p = d.open(Carried::Policy(3));
        let q = d.open(Carried::Policy(3));
        assert_eq!(d.policy_delivered(), Some(0), "nothing handed over yet");
        x.handed(Carried::X509(Handed { bundle: 2, crls: 1 }));
        p.handed(Carried::Policy(3));
        q.handed(Carried::Policy(4));
        assert_eq!(d.policy_delivered(), Some(3));
        assert_eq!(d.delivered(), Some(Handed { bundle: 2, crls: 1 }));
        assert_eq!(d.open_streams(), 1, "X.509 streams only");
        p.handed(Carried::Policy(2));
        assert_eq!(d.policy_delivered(), Some(3), "never goes back");
        drop(p);
        assert_eq!(d.policy_delivered(), Some(4));
        drop(x);
        assert_eq!(d.delivered(), None);
        drop(q);
        assert_eq!(d.policy_delivered(), None);
    }
}
