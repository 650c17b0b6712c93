//! Which trust bundle and which revocation lists the workloads have: for every open X.509
//! stream of the Workload API (FetchX509SVID, FetchX509Bundles), the highest bundle sequence
//! and CRL generation it has handed over.
//!
//! A message counts as handed over once the transport has taken it and asks the stream for the
//! next one; a message produced but not yet taken (a stream still sending) does not count. The
//! lowest value over the open streams is what every workload with a stream has: what the agent
//! can tell the CA before a new root is activated, and how the CA measures when a revocation
//! reached every workload.

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

/// The open X.509 streams and what each has handed over.
#[derive(Debug, Default)]
pub struct Delivery {
    streams: Mutex<HashMap<u64, Handed>>,
    next_id: AtomicU64,
}

impl Delivery {
    fn lock(&self) -> MutexGuard<'_, HashMap<u64, Handed>> {
        // A panic while holding the lock cannot leave the map inconsistent.
        self.streams
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Registers a new stream, which has handed over nothing yet.
    pub fn open(self: &Arc<Self>) -> StreamTicket {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        self.lock().insert(id, Handed::default());
        StreamTicket {
            delivery: Arc::clone(self),
            id,
        }
    }

    /// The lowest bundle sequence and the lowest CRL generation handed over by the open
    /// streams (each taken separately; 0 for a stream that has handed over nothing yet); `None`
    /// when no stream is open.
    pub fn delivered(&self) -> Option<Handed> {
        let streams = self.lock();
        let bundle = streams.values().map(|h| h.bundle).min()?;
        let crls = streams.values().map(|h| h.crls).min()?;
        Some(Handed { bundle, crls })
    }

    /// How many X.509 streams are open.
    pub fn open_streams(&self) -> usize {
        self.lock().len()
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
    pub fn handed(&self, what: Handed) {
        if let Some(s) = self.delivery.lock().get_mut(&self.id) {
            s.bundle = s.bundle.max(what.bundle);
            s.crls = s.crls.max(what.crls);
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
        let h = |bundle, crls| Handed { bundle, crls };
        let bundle = |d: &Delivery| d.delivered().map(|h| h.bundle);
        let d = Arc::new(Delivery::default());
        assert_eq!(d.delivered(), None);
        let a = d.open();
        let b = d.open();
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
        let d = Arc::new(Delivery::default());
        let a = d.open();
        let b = d.open();
        a.handed(Handed { bundle: 7, crls: 1 });
        b.handed(Handed { bundle: 9, crls: 3 });
        assert_eq!(d.delivered(), Some(Handed { bundle: 7, crls: 1 }));
        a.handed(Handed { bundle: 7, crls: 3 });
        assert_eq!(d.delivered(), Some(Handed { bundle: 7, crls: 3 }));
        a.handed(Handed { bundle: 9, crls: 2 });
        assert_eq!(
            d.delivered(),
            Some(Handed { bundle: 9, crls: 3 }),
            "never goes back"
        );
    }
}
