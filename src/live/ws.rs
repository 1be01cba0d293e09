//! One WebSocket client of `/events`, served on its connection's thread.
//!
//! The client sends `{"subscribe": ["task:42", "monitor:n1"]}` (or `["*"]`); the hub
//! (src/live/hub.rs) answers with the channels' histories and the feed position their
//! live messages continue from; this thread writes the history, then reads the feed
//! (src/live/feed.rs) from that position, keeping what the client subscribed. The socket
//! is non-blocking once the client has subscribed: a peer that does not read makes this
//! thread wait on `poll` while the feed moves on; once the feed has dropped the client's
//! position (it is `Limits::client_queue` messages behind), it is cut off with a close
//! frame saying why (1008, "too slow"). The hub and the foreman never wait for it.

use std::collections::{HashMap, VecDeque};
use std::io::ErrorKind;
use std::net::{Shutdown, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::atomic::Ordering;
use std::time::Duration;

use crossbeam_channel::bounded;
use serde::Deserialize;
use tungstenite::protocol::frame::coding::CloseCode;
use tungstenite::protocol::{CloseFrame, Role, WebSocketConfig};
use tungstenite::{Message, Utf8Bytes, WebSocket};

use super::feed::Read;
use super::http::Server;
use super::hub::Command;

/// How long the thread waits for messages before it looks at the socket again (a new
/// subscription, a close, a ping). The first subscription is read without this delay.
const POLL: Duration = Duration::from_millis(100);

/// How long the close frame may take to go out (after what tungstenite holds).
const CLOSE_TIMEOUT: Duration = Duration::from_secs(10);

/// The most queued messages taken at once before they are written and flushed.
const WRITE_BATCH: usize = 1024;

/// How long a client's thread lets messages gather after the first of a burst.
const GATHER: Duration = Duration::from_millis(10);

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Subscribe {
    subscribe: Vec<String>,
}

/// Why a client's connection ended.
enum End {
    /// The peer closed or the connection broke: nothing more to say.
    Gone,
    /// Cut off by the hub: its queue was full.
    TooSlow,
    /// The foreman is stopping.
    Stopping,
}

pub(crate) fn serve(stream: TcpStream, rest: Vec<u8>, server: &Server) {
    // Small buffers: a client reads little (subscriptions) and many may be connected.
    let config = WebSocketConfig::default()
        .read_buffer_size(4096)
        .write_buffer_size(16 * 1024)
        .max_write_buffer_size(64 * 1024)
        .max_message_size(Some(64 * 1024))
        .max_frame_size(Some(64 * 1024));
    let mut ws = WebSocket::from_partially_read(stream, rest, Role::Server, Some(config));
    let mut client = Client {
        id: server.next_client_id(),
        position: None,
        all_from: None,
        channels: HashMap::new(),
        backlog: VecDeque::new(),
        server,
    };
    let end = client.run(&mut ws);
    let _ = server
        .hub
        .commands
        .send(Command::Leave { client: client.id });
    let frame = match end {
        End::Gone => None,
        End::TooSlow => {
            server.hub.counters.lock().clients_cut_off += 1;
            Some(CloseFrame {
                code: CloseCode::Policy,
                reason: Utf8Bytes::from_static(
                    "too slow: this client fell too far behind the feed; reconnect and subscribe again",
                ),
            })
        }
        End::Stopping => Some(CloseFrame {
            code: CloseCode::Away,
            reason: Utf8Bytes::from_static("the foreman is stopping"),
        }),
    };
    if let Some(frame) = frame {
        // What was never handed to the socket is dropped; what is in tungstenite's buffer
        // goes first, then the close frame. A peer that reads again within
        // CLOSE_TIMEOUT gets the reason; one that never does costs this thread that long.
        let _ = ws.get_ref().set_nonblocking(false);
        let _ = ws.get_ref().set_write_timeout(Some(CLOSE_TIMEOUT));
        let _ = ws.close(Some(frame));
        let _ = ws.flush();
    }
    let _ = ws.get_ref().shutdown(Shutdown::Both);
}

struct Client<'a> {
    id: u64,
    /// Where this client reads the feed next; `None` before its first subscription.
    position: Option<u64>,
    /// With `*`: the feed position from which every message is this client's.
    all_from: Option<u64>,
    /// Each subscribed channel with the feed position its live messages start at (its
    /// earlier ones came in the replay).
    channels: HashMap<String, u64>,
    /// Messages taken (replayed or read from the feed) and not yet handed to the socket.
    backlog: VecDeque<Utf8Bytes>,
    server: &'a Server,
}

impl Client<'_> {
    fn run(&mut self, ws: &mut WebSocket<TcpStream>) -> End {
        // Until the first subscription there is nothing to send: block on reading it
        // (waking every second to see whether the foreman stops).
        let _ = ws.get_ref().set_read_timeout(Some(Duration::from_secs(1)));
        let mut subscribed = false;
        while !subscribed {
            if self.server.stopping.load(Ordering::SeqCst) {
                return End::Stopping;
            }
            match self.read(ws, true) {
                Ok(got) => subscribed = got,
                Err(end) => return end,
            }
        }
        if ws.get_ref().set_nonblocking(true).is_err() {
            return End::Gone;
        }
        let feed = std::sync::Arc::clone(&self.server.hub.feed);
        loop {
            if self.server.stopping.load(Ordering::SeqCst) {
                return End::Stopping;
            }
            if let Err(end) = self.read(ws, false) {
                return end;
            }
            match self.write_out(ws) {
                Ok(true) => {}
                Ok(false) => {
                    // The peer is not taking data: wait until it does (or says something),
                    // unless the feed has already left this client behind.
                    if self.position.is_some_and(|p| feed.dropped(p)) {
                        return End::TooSlow;
                    }
                    wait_for_socket(ws.get_ref(), POLL);
                    continue;
                }
                Err(end) => return end,
            }
            match self.take(&feed, POLL) {
                Read::Some if self.backlog.len() < WRITE_BATCH / 8 => {
                    // A trickle: let more gather, then write them in one go — one wake-up
                    // and a few writes for a burst, not one of each a message.
                    std::thread::sleep(GATHER);
                    if let Some(end) = end_of(self.take(&feed, Duration::ZERO)) {
                        return end;
                    }
                }
                read => {
                    if let Some(end) = end_of(read) {
                        return end;
                    }
                }
            }
        }
    }

    /// Takes from the feed what this client subscribed, up to a batch.
    fn take(&mut self, feed: &super::feed::Feed, wait: Duration) -> Read {
        let all_from = self.all_from;
        let channels = &self.channels;
        let wanted = |position: u64, channel: &str| {
            all_from.is_some_and(|from| position >= from)
                || channels.get(channel).is_some_and(|from| position >= *from)
        };
        let Some(position) = self.position.as_mut() else {
            return Read::Nothing;
        };
        feed.read(position, WRITE_BATCH, wait, wanted, &mut self.backlog)
    }

    /// Reads whatever the peer sent (or, with `first`, up to its first subscription: the
    /// socket is still blocking then). `Ok(true)` if a subscription was among it.
    fn read(&mut self, ws: &mut WebSocket<TcpStream>, first: bool) -> Result<bool, End> {
        let mut subscribed = false;
        loop {
            match ws.read() {
                Ok(Message::Text(text)) => {
                    subscribed |= self.subscribe(ws, &text)?;
                    if first && subscribed {
                        return Ok(true);
                    }
                }
                Ok(Message::Close(_)) => return Err(End::Gone),
                // Pings are answered by tungstenite at the next write or flush.
                Ok(_) => {}
                Err(tungstenite::Error::Io(e))
                    if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) =>
                {
                    return Ok(subscribed);
                }
                Err(_) => return Err(End::Gone),
            }
        }
    }

    /// Asks the hub for the channels' histories and where their live messages start, and
    /// takes both; or tells the client what was wrong with its request.
    fn subscribe(&mut self, ws: &mut WebSocket<TcpStream>, text: &str) -> Result<bool, End> {
        let channels = match serde_json::from_str::<Subscribe>(text) {
            Ok(Subscribe { subscribe }) if !subscribe.is_empty() => subscribe,
            _ => {
                let error = serde_json::json!({
                    "type": "error",
                    "error": "send {\"subscribe\": [\"*\"]} or a list of channels such as \
                              \"task:42\" and \"monitor:NAME\"",
                });
                self.backlog.push_back(Utf8Bytes::from(error.to_string()));
                let _ = self.write_out(ws);
                return Ok(false);
            }
        };
        let (reply, answer) = bounded(1);
        let asked = self.server.hub.commands.send(Command::Subscribe {
            client: self.id,
            channels,
            reply,
        });
        let Ok(subscribed) = asked
            .map_err(drop)
            .and_then(|()| answer.recv_timeout(Duration::from_secs(10)).map_err(drop))
        else {
            return Err(End::Stopping);
        };
        // What the hub newly subscribed starts at `from`; what came before is in the replay.
        let from = subscribed.from;
        if subscribed.all {
            self.all_from = Some(from);
        }
        for channel in subscribed.added {
            self.channels.insert(channel, from);
        }
        // The first subscription sets where this client starts reading the feed.
        self.position.get_or_insert(from);
        self.backlog.extend(subscribed.replay);
        Ok(true)
    }

    /// Writes the backlog. `Ok(true)`: all of it is on the socket; `Ok(false)`: the socket
    /// is full and some is left for later.
    fn write_out(&mut self, ws: &mut WebSocket<TcpStream>) -> Result<bool, End> {
        while let Some(text) = self.backlog.pop_front() {
            match ws.write(Message::Text(text.clone())) {
                Ok(()) => {}
                Err(tungstenite::Error::WriteBufferFull(_)) => {
                    // tungstenite drains its buffer only on a flush.
                    self.backlog.push_front(text);
                    match ws.flush() {
                        Ok(()) => {}
                        Err(tungstenite::Error::Io(e)) if e.kind() == ErrorKind::WouldBlock => {
                            return Ok(false);
                        }
                        Err(_) => return Err(End::Gone),
                    }
                }
                // The frame is in tungstenite's buffer; the socket took what it could.
                Err(tungstenite::Error::Io(e)) if e.kind() == ErrorKind::WouldBlock => {
                    return Ok(false);
                }
                Err(_) => return Err(End::Gone),
            }
        }
        match ws.flush() {
            Ok(()) => Ok(true),
            Err(tungstenite::Error::Io(e)) if e.kind() == ErrorKind::WouldBlock => Ok(false),
            Err(_) => Err(End::Gone),
        }
    }
}

/// How a read of the feed ends the connection, if it does.
fn end_of(read: Read) -> Option<End> {
    match read {
        Read::Some | Read::Nothing => None,
        Read::TooSlow => Some(End::TooSlow),
        Read::Stopped => Some(End::Stopping),
    }
}

/// Waits until the socket can take data or has something to read, or `timeout` passes.
fn wait_for_socket(stream: &TcpStream, timeout: Duration) {
    let mut fd = libc::pollfd {
        fd: stream.as_raw_fd(),
        events: libc::POLLIN | libc::POLLOUT,
        revents: 0,
    };
    let ms = i32::try_from(timeout.as_millis()).unwrap_or(i32::MAX);
    // SAFETY: one valid pollfd, alive for the call; the fd is the stream's, open.
    unsafe {
        libc::poll(&mut fd, 1, ms);
    }
}
