//! The feed: every live message in the hub's order, in one bounded ring that all clients
//! read from, each at its own position.
//!
//! A client's queue is its stretch of the ring between its position and the newest
//! message: bounded by the ring's capacity (`Limits::client_queue`). The hub appends and
//! never waits for a reader; when the ring is full the oldest message goes, and a client
//! whose position it was has fallen too far behind: it is cut off. Messages are shared
//! (reference-counted), never copied per client, so 100 clients cost one ring.
//!
//! One mutex guards the ring; the hub holds it to append a batch, a client to copy out
//! what it has not read (handles only, no I/O under the lock). The condvar wakes waiting
//! clients once per batch the hub appends.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::{Condvar, Mutex};
use tungstenite::Utf8Bytes;

pub(crate) struct Entry {
    pub channel: Arc<str>,
    pub text: Utf8Bytes,
}

struct Ring {
    entries: VecDeque<Entry>,
    /// The position (hub-wide message number) of `entries[0]`.
    first: u64,
    /// Set when the hub stops: readers end.
    stopped: bool,
}

impl Ring {
    /// The position the next message will have.
    fn next(&self) -> u64 {
        self.first + self.entries.len() as u64
    }
}

pub(crate) struct Feed {
    ring: Mutex<Ring>,
    more: Condvar,
    capacity: usize,
}

/// What a reader got from `Feed::read`.
pub(crate) enum Read {
    /// New messages were looked at (some may not have matched); the position moved.
    Some,
    /// Nothing new within the timeout.
    Nothing,
    /// The reader's position was overwritten: it fell more than the capacity behind.
    TooSlow,
    Stopped,
}

impl Feed {
    /// `first`: the position of the first message the hub will append.
    pub fn new(capacity: usize, first: u64) -> Feed {
        Feed {
            ring: Mutex::new(Ring {
                entries: VecDeque::new(),
                first,
                stopped: false,
            }),
            more: Condvar::new(),
            capacity: capacity.max(1),
        }
    }

    /// Appends messages (the hub, once per batch), dropping the oldest past the capacity,
    /// and wakes the readers that wait.
    pub fn append(&self, batch: &mut Vec<Entry>) {
        if batch.is_empty() {
            return;
        }
        let mut ring = self.ring.lock();
        for entry in batch.drain(..) {
            ring.entries.push_back(entry);
        }
        let over = ring.entries.len().saturating_sub(self.capacity);
        if over > 0 {
            ring.entries.drain(..over);
            ring.first += over as u64;
        }
        drop(ring);
        self.more.notify_all();
    }

    /// Whether the message at `position` is gone from the ring: its reader fell more than
    /// the capacity behind.
    pub fn dropped(&self, position: u64) -> bool {
        position < self.ring.lock().first
    }

    pub fn stop(&self) {
        self.ring.lock().stopped = true;
        self.more.notify_all();
    }

    /// Copies out (as handles) up to `max` messages from `*position` that `wanted` accepts,
    /// waiting up to `timeout` if there is none yet, and moves `*position` past what it
    /// looked at.
    pub fn read(
        &self,
        position: &mut u64,
        max: usize,
        timeout: Duration,
        wanted: impl Fn(u64, &str) -> bool,
        out: &mut VecDeque<Utf8Bytes>,
    ) -> Read {
        let mut ring = self.ring.lock();
        if ring.stopped {
            return Read::Stopped;
        }
        if *position >= ring.next() {
            self.more.wait_for(&mut ring, timeout);
            if ring.stopped {
                return Read::Stopped;
            }
            if *position >= ring.next() {
                return Read::Nothing;
            }
        }
        if *position < ring.first {
            return Read::TooSlow;
        }
        let start = (*position - ring.first) as usize;
        let mut looked = 0;
        for entry in ring.entries.range(start..).take(max) {
            if wanted(*position + looked, &entry.channel) {
                out.push_back(entry.text.clone());
            }
            looked += 1;
        }
        *position += looked;
        Read::Some
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(channel: &str, text: &str) -> Entry {
        Entry {
            channel: Arc::from(channel),
            text: Utf8Bytes::from(text.to_owned()),
        }
    }

    #[test]
    fn readers_get_their_channels_in_order_and_a_lagging_one_is_told() {
        let feed = Feed::new(3, 10);
        feed.append(&mut vec![entry("a", "1"), entry("b", "2"), entry("a", "3")]);
        let mut out = VecDeque::new();
        let mut at = 10;
        let only_a = |_: u64, c: &str| c == "a";
        assert!(matches!(
            feed.read(&mut at, 10, Duration::ZERO, only_a, &mut out),
            Read::Some
        ));
        assert_eq!(out, ["1", "3"]);
        assert_eq!(at, 13);
        let mut slow = 10;
        feed.append(&mut vec![entry("a", "4")]);
        assert!(matches!(
            feed.read(&mut slow, 10, Duration::ZERO, only_a, &mut out),
            Read::TooSlow
        ));
        assert!(matches!(
            feed.read(&mut at, 10, Duration::ZERO, only_a, &mut out),
            Read::Some
        ));
        assert_eq!(out.back().map(|t| t.as_str()), Some("4"));
        assert!(matches!(
            feed.read(&mut at, 10, Duration::from_millis(1), only_a, &mut out),
            Read::Nothing
        ));
        feed.stop();
        assert!(matches!(
            feed.read(&mut at, 10, Duration::ZERO, only_a, &mut out),
            Read::Stopped
        ));
    }
}
