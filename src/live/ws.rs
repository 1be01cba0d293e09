//! Every WebSocket client of `/events`, served by one thread (`snapq-live-ws`).
//!
//! A connection thread (src/live/http.rs) answers the upgrade and hands the socket here.
//! The client sends `{"subscribe": ["task:42", "monitor:n1"]}` (or `["*"]`); the hub
//! (src/live/hub.rs) answers with the channels' histories and the feed position their
//! live messages continue from; this thread queues the history, then takes from the feed
//! (src/live/feed.rs) from that position what the client subscribed. A peer that does not
//! read leaves its frames queued here while the feed moves on; once the feed has dropped
//! the client's position (it is `Limits::client_queue` messages behind), it is cut off
//! with a close frame saying why (1008, "too slow"). The hub and the foreman never wait
//! for a client.
//!
//! Why one thread for all: the scheduler shares the CPU between runnable threads by their
//! weight, and a nice-19 thread weighs 15 against a normal thread's 1,024. A thread for
//! each of 100 streaming clients weighed as much as one and a half of the foreman's own
//! threads, and took that share of a burst's CPU (BENCHMARKS.md); one thread weighs 15
//! whatever the number of clients. Sockets are non-blocking and waited on with one
//! `poll`, together with the feed's eventfd.
//!
//! tungstenite reads what a client sends, answers its pings and sends the final close; the
//! messages themselves are frames the hub made once for every client, written here as they
//! are (`writev`). The two never interleave inside a frame: tungstenite is asked to read
//! (and so perhaps to send a pong) only while no frame of ours is half written, and ours
//! go only once tungstenite has flushed what it holds.

use std::collections::{HashMap, VecDeque};
use std::io::{ErrorKind, IoSlice, Write};
use std::net::{IpAddr, Shutdown, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, bounded};
use serde::Deserialize;
use tungstenite::protocol::frame::coding::CloseCode;
use tungstenite::protocol::{CloseFrame, Role, WebSocketConfig};
use tungstenite::{Bytes, Message, Utf8Bytes, WebSocket};

use super::feed::{Feed, Read, text_frame};
use super::http::Server;
use super::hub::Command;
use crate::error::{Error, Result};

/// A socket whose upgrade was answered, with what the client sent past its request head.
pub(crate) struct Upgraded {
    pub stream: TcpStream,
    pub rest: Vec<u8>,
    /// The peer's address, whose share of the connection slots this one counts in.
    pub peer: IpAddr,
}

/// The most messages taken from the feed for one client in one turn.
const TAKE_MAX: usize = 1024;

/// The shortest time between two turns that take from the feed while the clients keep up:
/// in a burst the thread wakes at most this often and writes what gathered to each client
/// in one `writev`, rather than once for each of the hub's turns.
const GATHER: Duration = Duration::from_millis(10);

/// The most slices handed to one `writev`.
const SLICES: usize = 64;

/// How long a client cut off as too slow may take to read the rest of a half-written
/// frame and the close frame.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(10);

/// How long the close frames may take when the foreman stops (it waits for this thread).
const STOP_TIMEOUT: Duration = Duration::from_secs(1);

/// The longest `poll` sleeps with nothing to do (it wakes sooner for anything).
const IDLE: Duration = Duration::from_secs(1);

/// How long a subscription may wait for the hub's answer.
const HUB_TIMEOUT: Duration = Duration::from_secs(10);

/// The most channel names one client may subscribe to, over all its messages. Without a
/// bound one client sending ever more names grew the foreman to 914 MiB (issue 13, item
/// 10); the page subscribes to `*`, and a client that follows a few hundred tasks or
/// monitors by name stays well within it.
const MAX_CHANNELS_PER_CLIENT: usize = 1_000;

/// A client must subscribe within this long of connecting; one that does not only holds a
/// connection slot (issue 13, item 9).
const SUBSCRIBE_WITHIN: Duration = Duration::from_secs(10);

/// The most names in one subscribe message.
const MAX_NAMES_PER_MESSAGE: usize = 100;

/// The longest channel name (`monitor:` and a monitor name of at most 200 bytes).
const MAX_NAME_LEN: usize = 256;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Subscribe {
    subscribe: Vec<String>,
}

/// Why a client's connection ends.
enum End {
    /// The peer closed or the connection broke: nothing more to say.
    Gone,
    /// Its position left the feed.
    TooSlow,
    /// It did not subscribe in time, or did not answer a ping (`check_idle`).
    Idle(&'static str),
    /// The foreman is stopping.
    Stopping,
}

/// Starts the thread; it ends once the foreman stops and every client is closed.
pub(crate) fn start(server: Arc<Server>, upgraded: Receiver<Upgraded>) -> Result<JoinHandle<()>> {
    std::thread::Builder::new()
        .name("snapq-live-ws".into())
        .spawn(move || {
            super::lower_priority();
            serve(&server, &upgraded);
        })
        .map_err(|e| {
            Error::Runtime(format!(
                "cannot start the live view's WebSocket thread: {e}"
            ))
        })
}

fn serve(server: &Server, upgraded: &Receiver<Upgraded>) {
    let feed = Arc::clone(&server.hub.feed);
    let mut clients: Vec<Client> = Vec::new();
    // While the clients keep up after a turn that wrote feed messages: the next turn that
    // takes from the feed is not before this.
    let mut paced_until: Option<Instant> = None;
    let mut stopping_since: Option<Instant> = None;
    loop {
        let now = Instant::now();
        if stopping_since.is_none() && server.stopping.load(Ordering::SeqCst) {
            stopping_since = Some(now);
        }
        while let Ok(Upgraded { stream, rest, peer }) = upgraded.try_recv() {
            match Client::new(stream, rest, peer, server) {
                Some(client) if stopping_since.is_none() => clients.push(client),
                _ => server.release_connection(peer),
            }
        }
        let take = paced_until.is_none_or(|t| now >= t);
        let mut wrote = false;
        let mut more = false;
        for client in &mut clients {
            if let Some(since) = stopping_since {
                client.end(End::Stopping, since + STOP_TIMEOUT, server);
            }
            if client.closing.is_none()
                && let Err(end) = client.check_idle(now, server.config.limits.ping_interval)
            {
                client.end(end, now + CLOSE_TIMEOUT, server);
            }
            if client.closing.is_none() {
                let turn = client.turn(server, take);
                wrote |= turn.wrote;
                more |= turn.more;
                if let Err(end) = turn.result {
                    let deadline = match stopping_since {
                        Some(since) => since + STOP_TIMEOUT,
                        None => now + CLOSE_TIMEOUT,
                    };
                    client.end(end, deadline, server);
                }
            }
            if client.closing.is_some() {
                client.close_step();
            }
            // One client's turn at a time (see `super::lower_priority`).
            std::thread::yield_now();
        }
        clients.retain_mut(|client| {
            if client.done {
                let _ = client.ws.get_ref().shutdown(Shutdown::Both);
                let _ = server
                    .hub
                    .commands
                    .send(Command::Leave { client: client.id });
                server.release_connection(client.peer);
            }
            !client.done
        });
        if stopping_since.is_some() && clients.is_empty() {
            return;
        }
        if take {
            paced_until = (wrote && !more).then(|| now + GATHER);
        }
        wait(&mut clients, &feed, paced_until, more);
    }
}

/// Sleeps in `poll` until a socket needs this thread, the feed (while not paced) has
/// something, a pace or close deadline passes, or IDLE.
fn wait(clients: &mut [Client], feed: &Feed, paced_until: Option<Instant>, more: bool) {
    let now = Instant::now();
    let mut until = match paced_until {
        Some(t) if t > now => t,
        _ => now + IDLE,
    };
    let mut fds = Vec::with_capacity(clients.len() + 1);
    if paced_until.is_none_or(|t| t <= now) {
        fds.push(libc::pollfd {
            fd: feed.waker_fd(),
            events: libc::POLLIN,
            revents: 0,
        });
    }
    for client in clients.iter() {
        let mut events = 0;
        if client.closing.is_none() && !client.partial {
            events |= libc::POLLIN;
        }
        if client.blocked {
            events |= libc::POLLOUT;
        }
        if let Some(deadline) = client.closing {
            until = until.min(deadline);
        }
        fds.push(libc::pollfd {
            fd: client.ws.get_ref().as_raw_fd(),
            events,
            revents: 0,
        });
    }
    let ms = if more {
        0
    } else {
        // Round up: a pace of 0.4 ms must not become a busy loop of zero-timeout polls.
        let ms = until.saturating_duration_since(now).as_millis() + 1;
        i32::try_from(ms).unwrap_or(i32::MAX)
    };
    // SAFETY: a valid array of pollfds, alive for the call; every fd is open (the feed's
    // eventfd, each client's socket).
    let ready = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, ms) };
    if ready <= 0 {
        return;
    }
    let mut fds = fds.iter();
    if paced_until.is_none_or(|t| t <= now)
        && let Some(waker) = fds.next()
        && waker.revents != 0
    {
        feed.clear_wake();
    }
    for (client, fd) in clients.iter_mut().zip(fds) {
        client.readable |= fd.revents & (libc::POLLIN | libc::POLLHUP | libc::POLLERR) != 0;
    }
}

/// What one client's turn did.
struct Turn {
    /// Feed messages were written.
    wrote: bool,
    /// The feed read stopped at TAKE_MAX with more left.
    more: bool,
    result: std::result::Result<(), End>,
}

struct Client {
    ws: WebSocket<TcpStream>,
    id: u64,
    /// Where this client reads the feed next; `None` before its first subscription.
    position: Option<u64>,
    /// With `*`: the feed position from which every message is this client's.
    all_from: Option<u64>,
    /// Each subscribed channel with the feed position its live messages start at (its
    /// earlier ones came in the replay).
    channels: HashMap<String, u64>,
    /// Frames taken (replayed or read from the feed) and not yet written, as slices of
    /// whole frames.
    out: VecDeque<Bytes>,
    /// The first slice of `out` was partly written: a frame may be half on the wire.
    partial: bool,
    /// The socket (or tungstenite's buffer) could not take everything: wait for POLLOUT.
    blocked: bool,
    /// `poll` said the peer sent something (or hung up) since the last read; set at first,
    /// as the request's last bytes may already hold the subscription.
    readable: bool,
    /// Ending: the close frame to send (taken once handed to tungstenite).
    close: Option<CloseFrame>,
    /// Ending: give up on the peer at this time.
    closing: Option<Instant>,
    /// Its address (the connection counts in that address's share of slots).
    peer: IpAddr,
    /// When it connected (it must subscribe within SUBSCRIBE_WITHIN).
    connected: Instant,
    /// When the peer last sent anything (a message, a pong).
    heard: Instant,
    /// When this thread pinged the peer, if it has not answered yet.
    pinged: Option<Instant>,
    /// Ended: to be dropped.
    done: bool,
}

impl Client {
    fn new(stream: TcpStream, rest: Vec<u8>, peer: IpAddr, server: &Server) -> Option<Client> {
        stream.set_nonblocking(true).ok()?;
        // Small buffers: a client sends little (subscriptions) and many may be connected;
        // what it is sent does not go through tungstenite's buffer.
        let config = WebSocketConfig::default()
            .read_buffer_size(4096)
            .write_buffer_size(4096)
            .max_write_buffer_size(64 * 1024)
            .max_message_size(Some(64 * 1024))
            .max_frame_size(Some(64 * 1024));
        Some(Client {
            ws: WebSocket::from_partially_read(stream, rest, Role::Server, Some(config)),
            id: server.next_client_id(),
            position: None,
            all_from: None,
            channels: HashMap::new(),
            out: VecDeque::new(),
            partial: false,
            blocked: false,
            readable: true,
            close: None,
            closing: None,
            peer,
            connected: Instant::now(),
            heard: Instant::now(),
            pinged: None,
            done: false,
        })
    }

    /// Ends a client that holds a slot without using it: no subscription within
    /// SUBSCRIBE_WITHIN, or no answer to a ping within `ping` (`Limits::ping_interval`).
    /// Pings one that has been quiet for `ping`; browsers answer pings by themselves.
    fn check_idle(&mut self, now: Instant, ping: Duration) -> std::result::Result<(), End> {
        if self.position.is_none() && now.duration_since(self.connected) >= SUBSCRIBE_WITHIN {
            return Err(End::Idle("no subscription within 10 s of connecting"));
        }
        match self.pinged {
            Some(at) if now.duration_since(at) >= ping => Err(End::Idle("no answer to a ping")),
            None if now.duration_since(self.heard) >= ping && !self.partial => {
                // A ping with no payload, queued between whole frames.
                self.out.push_back(Bytes::from_static(&[0x89, 0x00]));
                self.pinged = Some(now);
                Ok(())
            }
            _ => Ok(()),
        }
    }

    /// Reads what the peer sent, takes from the feed (if `take`), writes.
    fn turn(&mut self, server: &Server, take: bool) -> Turn {
        let feed = &server.hub.feed;
        let mut turn = Turn {
            wrote: false,
            more: false,
            result: Ok(()),
        };
        if self.readable
            && !self.partial
            && let Err(end) = self.read(server)
        {
            turn.result = Err(end);
            return turn;
        }
        // What is queued goes first; only a client whose socket took all of it takes more
        // from the feed (so one that does not read falls behind the feed, and is cut off).
        let mut taken = false;
        loop {
            if !self.out.is_empty() {
                match self.write_out() {
                    Ok(true) => turn.wrote |= taken,
                    Ok(false) => {
                        if self.position.is_some_and(|p| feed.dropped(p)) {
                            turn.result = Err(End::TooSlow);
                        }
                        return turn;
                    }
                    Err(end) => {
                        turn.result = Err(end);
                        return turn;
                    }
                }
            }
            if !take || taken {
                return turn;
            }
            taken = true;
            match self.take(feed) {
                Read::Some { more } => turn.more = more,
                Read::Nothing => return turn,
                Read::TooSlow => {
                    turn.result = Err(End::TooSlow);
                    return turn;
                }
                Read::Stopped => {
                    turn.result = Err(End::Stopping);
                    return turn;
                }
            }
        }
    }

    /// Takes from the feed what this client subscribed, up to TAKE_MAX messages.
    fn take(&mut self, feed: &Feed) -> Read {
        let all_from = self.all_from;
        let channels = &self.channels;
        let wanted = |position: u64, channel: &str| {
            all_from.is_some_and(|from| position >= from)
                || channels.get(channel).is_some_and(|from| position >= *from)
        };
        let Some(position) = self.position.as_mut() else {
            return Read::Nothing;
        };
        feed.read(position, TAKE_MAX, wanted, &mut self.out)
    }

    /// Reads whatever the peer sent, subscribing as asked.
    fn read(&mut self, server: &Server) -> std::result::Result<(), End> {
        loop {
            let message = self.ws.read();
            if message.is_ok() {
                self.heard = Instant::now();
                self.pinged = None;
            }
            match message {
                Ok(Message::Text(text)) => self.subscribe(&text, server)?,
                Ok(Message::Close(_)) => return Err(End::Gone),
                // Pings are answered by tungstenite at this read or the next flush.
                Ok(_) => {}
                Err(tungstenite::Error::Io(e)) if e.kind() == ErrorKind::WouldBlock => {
                    self.readable = false;
                    return Ok(());
                }
                Err(_) => return Err(End::Gone),
            }
        }
    }

    /// Asks the hub for the channels' histories and where their live messages start, and
    /// queues the history; or tells the client what was wrong with its request. The hub
    /// answers between two of its turns: this thread waits for it, briefly.
    fn subscribe(&mut self, text: &str, server: &Server) -> std::result::Result<(), End> {
        let channels = match serde_json::from_str::<Subscribe>(text) {
            Ok(Subscribe { subscribe }) if !subscribe.is_empty() => subscribe,
            _ => {
                self.refuse(
                    "send {\"subscribe\": [\"*\"]} or a list of channels such as \
                     \"task:42\" and \"monitor:NAME\"",
                );
                return Ok(());
            }
        };
        // Bounded before the hub sees anything: a refused message costs the foreman no
        // memory (MAX_CHANNELS_PER_CLIENT).
        if channels.len() > MAX_NAMES_PER_MESSAGE {
            self.refuse(&format!(
                "at most {MAX_NAMES_PER_MESSAGE} channels in one subscribe message; send \
                 several, or subscribe to [\"*\"]"
            ));
            return Ok(());
        }
        if let Some(long) = channels.iter().find(|c| c.len() > MAX_NAME_LEN) {
            self.refuse(&format!(
                "a channel name is at most {MAX_NAME_LEN} bytes ({} given)",
                long.len()
            ));
            return Ok(());
        }
        let new = channels
            .iter()
            .filter(|c| c.as_str() != "*" && !self.channels.contains_key(*c))
            .count();
        if self.all_from.is_none() && self.channels.len() + new > MAX_CHANNELS_PER_CLIENT {
            self.refuse(&format!(
                "at most {MAX_CHANNELS_PER_CLIENT} channels per connection; subscribe to \
                 [\"*\"] to follow everything"
            ));
            return Ok(());
        }
        let (reply, answer) = bounded(1);
        let asked = server.hub.commands.send(Command::Subscribe {
            client: self.id,
            channels,
            reply,
        });
        let Ok(subscribed) = asked
            .map_err(drop)
            .and_then(|()| answer.recv_timeout(HUB_TIMEOUT).map_err(drop))
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
        self.out.extend(subscribed.replay);
        Ok(())
    }

    /// Queues an `{"type": "error"}` message saying what was wrong with a request; the
    /// connection stays open.
    fn refuse(&mut self, error: &str) {
        let error = serde_json::json!({ "type": "error", "error": error });
        self.out
            .push_back(Bytes::from(text_frame(error.to_string())));
    }

    /// Writes what is queued. `Ok(true)`: all of it is on the socket; `Ok(false)`: the
    /// socket is full (or tungstenite's buffer not yet empty) and some is left for later.
    fn write_out(&mut self) -> std::result::Result<bool, End> {
        self.blocked = false;
        if !self.partial {
            // A pong tungstenite holds goes whole before any frame of ours.
            match self.ws.flush() {
                Ok(()) => {}
                Err(tungstenite::Error::Io(e)) if e.kind() == ErrorKind::WouldBlock => {
                    self.blocked = true;
                    return Ok(false);
                }
                Err(_) => return Err(End::Gone),
            }
        }
        while !self.out.is_empty() {
            let slices: Vec<IoSlice<'_>> = self
                .out
                .iter()
                .take(SLICES)
                .map(|b| IoSlice::new(b))
                .collect();
            match self.ws.get_mut().write_vectored(&slices) {
                Ok(0) => return Err(End::Gone),
                Ok(written) => self.consume(written),
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    self.blocked = true;
                    return Ok(false);
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(_) => return Err(End::Gone),
            }
        }
        Ok(true)
    }

    /// Drops what the socket took from the front of `out`.
    fn consume(&mut self, mut written: usize) {
        while let Some(front) = self.out.front_mut() {
            if written < front.len() {
                *front = front.slice(written..);
                self.partial = true;
                return;
            }
            written -= front.len();
            self.out.pop_front();
        }
        self.partial = false;
    }

    /// Starts ending the connection (once): what was never written is dropped, but for
    /// the rest of a half-written frame; then the close frame saying why, if there is
    /// something to say, sent by `close_step` until `deadline`.
    fn end(&mut self, end: End, deadline: Instant, server: &Server) {
        if self.closing.is_some() || self.done {
            return;
        }
        self.close = match end {
            End::Gone => {
                self.done = true;
                return;
            }
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
            End::Idle(why) => Some(CloseFrame {
                code: CloseCode::Policy,
                reason: Utf8Bytes::from_static(why),
            }),
        };
        if self.partial {
            self.out.truncate(1);
        } else {
            self.out.clear();
        }
        self.closing = Some(deadline);
    }

    /// Goes on sending the rest of a half-written frame, then the close frame; done once
    /// all is out, the peer is gone, or the deadline passed.
    fn close_step(&mut self) {
        if self
            .closing
            .is_some_and(|deadline| Instant::now() >= deadline)
        {
            self.done = true;
            return;
        }
        match self.write_out() {
            Ok(true) => {}
            Ok(false) => return,
            Err(_) => {
                self.done = true;
                return;
            }
        }
        if let Some(frame) = self.close.take() {
            // Queued in tungstenite's buffer and written as far as the socket takes it.
            match self.ws.close(Some(frame)) {
                Ok(()) => {}
                Err(tungstenite::Error::Io(e)) if e.kind() == ErrorKind::WouldBlock => {}
                Err(_) => {
                    self.done = true;
                    return;
                }
            }
        }
        match self.ws.flush() {
            Ok(()) => self.done = true,
            Err(tungstenite::Error::Io(e)) if e.kind() == ErrorKind::WouldBlock => {
                self.blocked = true;
            }
            Err(_) => self.done = true,
        }
    }
}
