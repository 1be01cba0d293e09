//! One WebSocket client of `/events`, served on its connection's thread.
//!
//! The client sends `{"subscribe": ["task:42", "monitor:n1"]}` (or `["*"]`); the hub
//! (src/live/hub.rs) puts the channels' histories and then their live messages on this
//! client's own bounded queue, which this thread writes out. The socket is non-blocking
//! once the client has subscribed: a peer that does not read makes this thread wait on
//! `poll`, its queue fills, and the hub cuts it off — the hub and the foreman never wait
//! for it. The close frame then says why (1008, "too slow").

use std::collections::VecDeque;
use std::io::ErrorKind;
use std::net::{Shutdown, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender, bounded};
use serde::Deserialize;
use tungstenite::protocol::frame::coding::CloseCode;
use tungstenite::protocol::{CloseFrame, Role, WebSocketConfig};
use tungstenite::{Message, Utf8Bytes, WebSocket};

use super::http::Server;
use super::hub::{Command, Out};

/// How long the thread waits for messages before it looks at the socket again (a new
/// subscription, a close, a ping). The first subscription is read without this delay.
const POLL: Duration = Duration::from_millis(100);

/// How long the close frame may take to go out (after what tungstenite holds).
const CLOSE_TIMEOUT: Duration = Duration::from_secs(10);

/// How many queued messages are written before the socket is flushed.
const WRITE_BATCH: usize = 1024;

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
        .max_write_buffer_size(256 * 1024)
        .max_message_size(Some(64 * 1024))
        .max_frame_size(Some(64 * 1024));
    let mut ws = WebSocket::from_partially_read(stream, rest, Role::Server, Some(config));
    let mut client = Client {
        id: server.next_client_id(),
        queue: bounded(server.config.limits.client_queue.max(1)),
        slow: Arc::new(AtomicBool::new(false)),
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
        End::TooSlow => Some(CloseFrame {
            code: CloseCode::Policy,
            reason: Utf8Bytes::from_static(
                "too slow: this client fell too far behind the feed; reconnect and subscribe again",
            ),
        }),
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
    /// This client's bounded queue: the hub sends, this thread receives.
    queue: (Sender<Out>, Receiver<Out>),
    /// Set by the hub when it cuts this client off.
    slow: Arc<AtomicBool>,
    /// Messages taken from the queue and not yet handed to the socket.
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
        loop {
            if self.slow.load(Ordering::SeqCst) {
                return End::TooSlow;
            }
            if self.server.stopping.load(Ordering::SeqCst) {
                return End::Stopping;
            }
            if let Err(end) = self.read(ws, false) {
                return end;
            }
            match self.write_out(ws) {
                Ok(true) => {}
                Ok(false) => {
                    // The peer is not taking data: wait until it does (or says something).
                    wait_for_socket(ws.get_ref(), POLL);
                    continue;
                }
                Err(end) => return end,
            }
            match self.queue.1.recv_timeout(POLL) {
                Ok(out) => {
                    self.take(out);
                    while self.backlog.len() < WRITE_BATCH {
                        match self.queue.1.try_recv() {
                            Ok(out) => self.take(out),
                            Err(_) => break,
                        }
                    }
                }
                Err(RecvTimeoutError::Timeout) => {}
                // The hub let go of us: cut off, or stopping.
                Err(RecvTimeoutError::Disconnected) => {
                    return if self.slow.load(Ordering::SeqCst) {
                        End::TooSlow
                    } else {
                        End::Stopping
                    };
                }
            }
        }
    }

    fn take(&mut self, out: Out) {
        match out {
            Out::One(text) => self.backlog.push_back(text),
            Out::Many(texts) => self.backlog.extend(texts),
        }
    }

    /// Reads whatever the peer sent (or, with `first`, up to its first subscription: the
    /// socket is still blocking then). `Ok(true)` if a subscription was among it.
    fn read(&mut self, ws: &mut WebSocket<TcpStream>, first: bool) -> Result<bool, End> {
        let mut subscribed = false;
        loop {
            match ws.read() {
                Ok(Message::Text(text)) => {
                    subscribed |= self.subscribe(ws, &text);
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

    /// Hands a subscription to the hub, or tells the client what was wrong with it.
    fn subscribe(&mut self, ws: &mut WebSocket<TcpStream>, text: &str) -> bool {
        match serde_json::from_str::<Subscribe>(text) {
            Ok(Subscribe { subscribe }) if !subscribe.is_empty() => {
                let _ = self.server.hub.commands.send(Command::Subscribe {
                    client: self.id,
                    channels: subscribe,
                    queue: self.queue.0.clone(),
                    slow: Arc::clone(&self.slow),
                });
                true
            }
            _ => {
                let error = serde_json::json!({
                    "type": "error",
                    "error": "send {\"subscribe\": [\"*\"]} or a list of channels such as \
                              \"task:42\" and \"monitor:NAME\"",
                });
                self.backlog.push_front(Utf8Bytes::from(error.to_string()));
                let _ = self.write_out(ws);
                false
            }
        }
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
