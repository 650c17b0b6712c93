//! Which trust bundle the workloads have: for every open X.509 stream of the Workload API
//! (FetchX509SVID, FetchX509Bundles), the highest bundle sequence it has handed over.
//!
//! A message counts as handed over once the transport has taken it and asks the stream for the
//! next one; a message produced but not yet taken (a stream still sending) does not count. The
//! lowest value over the open streams is the sequence every workload with a stream has: what
//! the agent can tell the CA before a new root is activated.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

/// The open X.509 streams and what each has handed over.
#[derive(Debug, Default)]
pub struct Delivery {
    streams: Mutex<HashMap<u64, u64>>,
    next_id: AtomicU64,
}

impl Delivery {
    fn lock(&self) -> MutexGuard<'_, HashMap<u64, u64>> {
        // A panic while holding the lock cannot leave the map inconsistent.
        self.streams
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Registers a new stream, which has handed over nothing yet.
    pub fn open(self: &Arc<Self>) -> StreamTicket {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        self.lock().insert(id, 0);
        StreamTicket {
            delivery: Arc::clone(self),
            id,
        }
    }

    /// The lowest bundle sequence handed over by every open stream (0 for a stream that has
    /// handed over nothing yet); `None` when no stream is open.
    pub fn delivered(&self) -> Option<u64> {
        self.lock().values().copied().min()
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
    /// The stream handed over a message carrying bundle `sequence`.
    pub fn handed(&self, sequence: u64) {
        if let Some(s) = self.delivery.lock().get_mut(&self.id) {
            *s = (*s).max(sequence);
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
        let d = Arc::new(Delivery::default());
        assert_eq!(d.delivered(), None);
        let a = d.open();
        let b = d.open();
        assert_eq!(d.delivered(), Some(0), "nothing handed over yet");
        a.handed(5);
        assert_eq!(d.delivered(), Some(0), "b is still behind");
        b.handed(4);
        assert_eq!(d.delivered(), Some(4));
        b.handed(3);
        assert_eq!(d.delivered(), Some(4), "never goes back");
        drop(b);
        assert_eq!(d.delivered(), Some(5));
        assert_eq!(d.open_streams(), 1);
        drop(a);
        assert_eq!(d.delivered(), None);
    }
}
