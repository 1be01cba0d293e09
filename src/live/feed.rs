//! The feed: every live message in the hub's order, as ready-to-send WebSocket frames, in
//! one bounded ring of blocks that all clients read from, each at its own position.
//!
//! The hub frames each message once and appends one block a turn: the turn's frames back
//! to back in one buffer, with where each ends and its channel. A message no client
//! wanted when it came is a place holder: it has a position and no bytes, and nobody
//! takes it (a client subscribing later gets it, framed, in its replay). A client takes byte ranges
//! of that buffer (reference-counted slices, one for each run of consecutive messages it
//! wants: one a block for a client on `*`) and writes them to its socket as they are, so
//! the work and memory a message costs do not grow with the clients.
//!
//! A client's queue is its stretch of the ring between its position and the newest
//! message, bounded by the ring's capacity (`Limits::client_queue`): the hub appends and
//! never waits for a reader; past the capacity the oldest blocks go, and a client whose
//! position was in them has fallen too far behind: it is cut off.
//!
//! One mutex guards the ring; the hub holds it to append a block, the WebSocket thread
//! to take slices of what a client has not read (no I/O and no copying of message bytes
//! under the lock). An eventfd wakes the WebSocket thread once per block (and for a new
//! connection, and at stop): it waits on it in the same `poll` as on its sockets.

use std::collections::VecDeque;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::Arc;

use parking_lot::Mutex;
use tungstenite::Bytes;
use tungstenite::protocol::frame::Frame;
use tungstenite::protocol::frame::coding::{Data, OpCode};

/// A text message as the WebSocket frame a server sends (unmasked, final), framed by
/// tungstenite.
pub(crate) fn text_frame(text: impl Into<Bytes>) -> Vec<u8> {
    let frame = Frame::message(text, OpCode::Data(Data::Text), true);
    let mut out = Vec::with_capacity(frame.len());
    // Writing into a Vec cannot fail.
    let _ = frame.format(&mut out);
    out
}

/// One turn's messages, built by the hub (`Block::push`) and then shared read-only.
#[derive(Default)]
pub(crate) struct Block {
    /// Each message's frame, back to back.
    frames: Vec<u8>,
    /// Where each message's frame ends in `frames`.
    ends: Vec<usize>,
    /// Each message's channel; `None` for a place holder (`skip`).
    channels: Vec<Option<Arc<str>>>,
}

impl Block {
    /// Adds one message's frame.
    pub fn push(&mut self, channel: Arc<str>, frame: &[u8]) {
        self.frames.extend_from_slice(frame);
        self.ends.push(self.frames.len());
        self.channels.push(Some(channel));
    }

    /// Adds a place holder for a message no client wanted when it came (the hub kept it
    /// unrendered): it takes a position, no bytes, and no reader takes it.
    pub fn skip(&mut self) {
        self.ends.push(self.frames.len());
        self.channels.push(None);
    }

    pub fn is_empty(&self) -> bool {
        self.ends.is_empty()
    }
}

/// A block in the ring: its frames as one shared buffer that clients slice.
struct Shared {
    /// The position (hub-wide message number) of its first message.
    first: u64,
    frames: Bytes,
    ends: Vec<usize>,
    channels: Vec<Option<Arc<str>>>,
}

impl Shared {
    fn start(&self, index: usize) -> usize {
        if index == 0 { 0 } else { self.ends[index - 1] }
    }
}

struct Ring {
    blocks: VecDeque<Shared>,
    /// The position of the first message kept (of `blocks[0]`, if any).
    first: u64,
    /// Messages kept over all blocks.
    len: usize,
    /// Set when the hub stops: readers end.
    stopped: bool,
}

impl Ring {
    /// The position the next message will have.
    fn next(&self) -> u64 {
        self.first + self.len as u64
    }
}

pub(crate) struct Feed {
    ring: Mutex<Ring>,
    /// An eventfd, readable once something was appended (or `wake` called) since the
    /// WebSocket thread last cleared it.
    waker: OwnedFd,
    capacity: usize,
}

/// What a reader got from `Feed::read`.
pub(crate) enum Read {
    /// New messages were looked at (some may not have matched) and the position moved;
    /// `more`: the read stopped at `max` with newer messages left.
    Some {
        more: bool,
    },
    /// Nothing new within the timeout.
    Nothing,
    /// The reader's position was dropped: it fell more than the capacity behind.
    TooSlow,
    Stopped,
}

impl Feed {
    /// `first`: the position of the first message the hub will append. Fails only if
    /// the eventfd cannot be made (out of file descriptors).
    pub fn new(capacity: usize, first: u64) -> std::io::Result<Feed> {
        // SAFETY: eventfd takes no pointers; a non-negative result is a new fd we own.
        let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(Feed {
            ring: Mutex::new(Ring {
                blocks: VecDeque::new(),
                first,
                len: 0,
                stopped: false,
            }),
            // SAFETY: `fd` was just returned by eventfd and is owned by nothing else.
            waker: unsafe { OwnedFd::from_raw_fd(fd) },
            capacity: capacity.max(1),
        })
    }

    /// Makes the waker readable: the WebSocket thread's `poll` returns.
    pub fn wake(&self) {
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a live u64 to our own eventfd. It fails only when
        // the counter would overflow, and then it is readable already.
        unsafe { libc::write(self.waker.as_raw_fd(), (&raw const one).cast(), 8) };
    }

    /// The waker's fd, to `poll` for reading.
    pub fn waker_fd(&self) -> RawFd {
        self.waker.as_raw_fd()
    }

    /// Resets the waker after `poll` said it is readable.
    pub fn clear_wake(&self) {
        let mut count: u64 = 0;
        // SAFETY: reads 8 bytes into a live u64 from our own non-blocking eventfd.
        unsafe { libc::read(self.waker.as_raw_fd(), (&raw mut count).cast(), 8) };
    }

    /// Appends a block (the hub, once per turn), leaving `block` empty; drops the oldest
    /// blocks while more than the capacity is kept (never the newest), and wakes the
    /// readers that wait.
    pub fn append(&self, block: &mut Block) {
        if block.is_empty() {
            return;
        }
        // Place holders only: the positions move, but no reader has anything to take.
        let wake = !block.frames.is_empty();
        let Block {
            frames,
            ends,
            channels,
        } = std::mem::take(block);
        let mut ring = self.ring.lock();
        let shared = Shared {
            first: ring.next(),
            frames: Bytes::from(frames),
            ends,
            channels,
        };
        ring.len += shared.ends.len();
        ring.blocks.push_back(shared);
        while ring.len > self.capacity && ring.blocks.len() > 1 {
            if let Some(old) = ring.blocks.pop_front() {
                ring.len -= old.ends.len();
                ring.first += old.ends.len() as u64;
            }
        }
        drop(ring);
        if wake {
            self.wake();
        }
    }

    /// Whether the message at `position` is gone from the ring: its reader fell more than
    /// the capacity behind.
    pub fn dropped(&self, position: u64) -> bool {
        position < self.ring.lock().first
    }

    pub fn stop(&self) {
        self.ring.lock().stopped = true;
        self.wake();
    }

    /// Takes (as slices of the shared frames) up to `max` messages from `*position` that
    /// `wanted` accepts, consecutive ones as one slice, and moves `*position` past what
    /// it looked at. Place holders count towards `max` but are never taken.
    pub fn read(
        &self,
        position: &mut u64,
        max: usize,
        wanted: impl Fn(u64, &str) -> bool,
        out: &mut VecDeque<Bytes>,
    ) -> Read {
        let ring = self.ring.lock();
        if ring.stopped {
            return Read::Stopped;
        }
        if *position >= ring.next() {
            return Read::Nothing;
        }
        if *position < ring.first {
            return Read::TooSlow;
        }
        let mut looked = 0;
        // Blocks are in order and contiguous: skip to the one holding `*position`.
        let skip = ring
            .blocks
            .partition_point(|b| b.first + b.ends.len() as u64 <= *position);
        for block in ring.blocks.range(skip..) {
            let from = (*position - block.first) as usize;
            // The run of wanted messages being gathered: its first index in the block.
            let mut run: Option<usize> = None;
            let mut index = from;
            while index < block.ends.len() && looked < max {
                let at = *position;
                let taken = block.channels[index]
                    .as_deref()
                    .is_some_and(|channel| wanted(at, channel));
                if taken {
                    run.get_or_insert(index);
                } else if let Some(start) = run.take() {
                    out.push_back(block.frames.slice(block.start(start)..block.start(index)));
                }
                index += 1;
                *position += 1;
                looked += 1;
            }
            if let Some(start) = run {
                out.push_back(block.frames.slice(block.start(start)..block.start(index)));
            }
            if looked >= max {
                break;
            }
        }
        Read::Some {
            more: *position < ring.next(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn block(messages: &[(&str, &str)]) -> Block {
        let mut block = Block::default();
        for (channel, text) in messages {
            block.push(Arc::from(*channel), text.as_bytes());
        }
        block
    }

    fn joined(out: &mut VecDeque<Bytes>) -> String {
        let text = out
            .iter()
            .map(|b| String::from_utf8_lossy(b).into_owned())
            .collect::<Vec<_>>()
            .join("|");
        out.clear();
        text
    }

    #[test]
    fn readers_get_their_channels_in_order_and_a_lagging_one_is_told() {
        let feed = Feed::new(3, 10).unwrap();
        feed.append(&mut block(&[("a", "1"), ("b", "2"), ("a", "3")]));
        let mut out = VecDeque::new();
        let mut at = 10;
        let only_a = |_: u64, c: &str| c == "a";
        assert!(matches!(
            feed.read(&mut at, 10, only_a, &mut out),
            Read::Some { .. }
        ));
        // One slice a run of wanted messages.
        assert_eq!(joined(&mut out), "1|3");
        assert_eq!(at, 13);
        let mut slow = 10;
        feed.append(&mut block(&[("a", "4")]));
        assert!(matches!(
            feed.read(&mut slow, 10, only_a, &mut out),
            Read::TooSlow
        ));
        assert!(matches!(
            feed.read(&mut at, 10, only_a, &mut out),
            Read::Some { .. }
        ));
        assert_eq!(joined(&mut out), "4");
        assert!(matches!(
            feed.read(&mut at, 10, only_a, &mut out),
            Read::Nothing
        ));
        feed.stop();
        assert!(matches!(
            feed.read(&mut at, 10, only_a, &mut out),
            Read::Stopped
        ));
    }

    #[test]
    fn a_reader_on_everything_takes_each_block_as_one_slice_and_stops_at_max() {
        let feed = Feed::new(100, 0).unwrap();
        feed.append(&mut block(&[("a", "1"), ("b", "2")]));
        feed.append(&mut block(&[("c", "3"), ("a", "4"), ("b", "5")]));
        let all = |_: u64, _: &str| true;
        let mut out = VecDeque::new();
        let mut at = 1;
        assert!(matches!(
            feed.read(&mut at, 3, all, &mut out),
            Read::Some { more: true }
        ));
        assert_eq!(joined(&mut out), "2|34");
        assert_eq!(at, 4);
        assert!(matches!(
            feed.read(&mut at, 3, all, &mut out),
            Read::Some { more: false }
        ));
        assert_eq!(joined(&mut out), "5");
        assert_eq!(at, 5);
    }

    fn readable(fd: RawFd) -> bool {
        let mut pollfd = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd for the call.
        unsafe { libc::poll(&mut pollfd, 1, 0) == 1 }
    }

    #[test]
    fn the_waker_is_readable_after_an_append_or_a_stop_until_cleared() {
        let feed = Feed::new(10, 0).unwrap();
        assert!(!readable(feed.waker_fd()));
        feed.append(&mut block(&[("a", "1")]));
        feed.append(&mut block(&[("a", "2")]));
        assert!(readable(feed.waker_fd()));
        feed.clear_wake();
        assert!(!readable(feed.waker_fd()));
        // An empty turn wakes nobody.
        feed.append(&mut Block::default());
        assert!(!readable(feed.waker_fd()));
        feed.stop();
        assert!(readable(feed.waker_fd()));
    }

    #[test]
    fn place_holders_take_positions_but_no_reader_gets_them_nor_is_woken() {
        let feed = Feed::new(10, 0).unwrap();
        let mut quiet = Block::default();
        quiet.skip();
        quiet.skip();
        feed.append(&mut quiet);
        assert!(!readable(feed.waker_fd()));
        let mut mixed = Block::default();
        mixed.push(Arc::from("a"), b"3");
        mixed.skip();
        mixed.push(Arc::from("a"), b"5");
        feed.append(&mut mixed);
        assert!(readable(feed.waker_fd()));
        let all = |_: u64, _: &str| true;
        let mut out = VecDeque::new();
        let mut at = 0;
        assert!(matches!(
            feed.read(&mut at, 10, all, &mut out),
            Read::Some { more: false }
        ));
        // The place holder between them splits the run.
        assert_eq!(joined(&mut out), "3|5");
        assert_eq!(at, 5);
    }

    #[test]
    fn whole_blocks_go_once_past_the_capacity_but_never_the_newest() {
        let feed = Feed::new(2, 0).unwrap();
        feed.append(&mut block(&[("a", "1"), ("a", "2")]));
        feed.append(&mut block(&[("a", "3"), ("a", "4"), ("a", "5")]));
        assert!(feed.dropped(1));
        assert!(!feed.dropped(2));
        let mut out = VecDeque::new();
        let mut at = 2;
        let all = |_: u64, _: &str| true;
        assert!(matches!(
            feed.read(&mut at, 10, all, &mut out),
            Read::Some { .. }
        ));
        assert_eq!(joined(&mut out), "345");
    }
}
