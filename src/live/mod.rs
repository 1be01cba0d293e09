//! The live view (SPEC "Live view"): `snapq run --http ADDR` serves a page, a status
//! document, Prometheus metrics and a WebSocket feed of task and monitor events.
//!
//! # How events flow, and why the foreman never waits for a browser
//!
//! ```text
//! workers, foreman loop ─try_send─▶ [events, bounded] ─▶ hub thread ─append─▶ [feed ring, bounded] ─▶ WebSocket thread ─▶ sockets
//! ```
//!
//! - Producers (workers for task events, the foreman loop for monitor results) build a
//!   small `Event` and `try_send` it: never a block, never a lock. If the hub has fallen
//!   `EVENT_QUEUE` events behind, the event is dropped and counted (`/metrics`,
//!   `snapq_live_events_dropped_total`; the heartbeat's `events_dropped`). What must stay
//!   right regardless, the workers count themselves (`Tally`: tasks running).
//! - The hub thread (src/live/hub.rs) owns every channel's history: it numbers each
//!   message (`seq`, per channel), keeps it, and appends it to the feed (src/live/feed.rs),
//!   a ring every client reads at its own position. It serialises and frames a message
//!   once, when it comes if a client wants it then, else only if a replay needs it: with
//!   no one watching, a burst costs the hub no JSON at all. The hub
//!   never waits for a reader: the ring drops its oldest messages when full, and a client
//!   whose position they held is cut off (sent a close frame with the reason).
//!   A subscription is answered on the hub thread between two messages — the history so
//!   far and the feed position the live messages continue from — so a client's sequence
//!   has no gap and no duplicate.
//! - One thread a request serves plain requests and WebSocket upgrades (src/live/http.rs);
//!   one thread serves every WebSocket (src/live/ws.rs); at most
//!   `Limits::max_connections` connections at a time, WebSockets included, a quarter of
//!   them from one address; a request head must come whole within 5 s, and a WebSocket
//!   that does not subscribe or answer pings is closed.
//! - Every live view thread runs at nice 19: a busy foreman comes first.
//!
//! Memory is bounded by `Limits`: channels kept, messages a channel and in all, the feed's
//! length, connections.

mod feed;
mod http;
mod hub;
mod metrics;
mod ws;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, AtomicUsize, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use crossbeam_channel::{Sender, bounded};

use crate::error::{Error, Result};
use crate::monitor::RoundResult;

pub use hub::Limits;

/// How many events may wait for the hub before producers drop (and count) them. At the
/// fastest drain (~100,000 tasks/s, two events a task) this is 80 ms of events, against
/// the hub's 2 ms turns; the channel allocates every slot up front (~1.5 MiB), which is
/// what keeps it from being larger.
const EVENT_QUEUE: usize = 16_384;

/// What `--http` and its companions configure.
#[derive(Debug, Clone)]
pub struct LiveConfig {
    /// Where to listen, as given (`127.0.0.1:8080`, `[::1]:0`).
    pub addr: String,
    /// Required on every request when set: `Authorization: Bearer TOKEN` or `?token=TOKEN`.
    /// Required for an address beyond loopback.
    pub token: Option<String>,
    /// Host names a request's Host header may carry besides IP literals and `localhost`
    /// (`--http-allow-host`): names this machine is reached by, e.g. through a proxy.
    pub allow_hosts: Vec<String>,
    pub limits: Limits,
    /// The database, for `/api/status`, `/metrics` and the heartbeat's queue figures.
    pub db: PathBuf,
    /// The foreman's worker count, for the page.
    pub workers: usize,
}

impl LiveConfig {
    /// Checks the address and token. An address beyond loopback needs a token: without
    /// one anybody who reaches the port would see (and a page could read) task data.
    pub fn validate(&self) -> Result<SocketAddr> {
        let addr: SocketAddr = self.addr.parse().map_err(|e| {
            Error::bad_input(
                "--http",
                format!(
                    "{:?} is not an address to listen on ({e}); give IP:PORT, e.g. 127.0.0.1:8080",
                    self.addr
                ),
            )
        })?;
        if let Some(token) = &self.token
            && !made_of(token, b"-._~")
        {
            return Err(Error::bad_input(
                "--http-token",
                "use letters, digits and - . _ ~ only (it travels in URLs), e.g. the output of \
                     `head -c 24 /dev/urandom | base64 | tr '+/' '-_'`",
            ));
        }
        if !addr.ip().is_loopback() && self.token.is_none() {
            return Err(Error::bad_input(
                "--http",
                format!(
                    "{addr} is reachable from other machines; give --http-token TOKEN \
                     (SNAPQ_HTTP_TOKEN) to serve it there, or listen on 127.0.0.1 and reach it \
                     through an SSH tunnel"
                ),
            ));
        }
        if self.limits.ping_interval < Duration::from_millis(500) {
            return Err(Error::bad_input(
                "--http-ping-interval",
                "give at least 0.5 seconds (the default is 30)",
            ));
        }
        for name in &self.allow_hosts {
            if !made_of(name, b"-._") {
                return Err(Error::bad_input(
                    "--http-allow-host",
                    format!("{name:?} is not a host name (letters, digits, '-', '.', '_')"),
                ));
            }
        }
        Ok(addr)
    }
}

/// Whether `text` is non-empty and only ASCII letters, digits and the bytes of `extra`.
fn made_of(text: &str, extra: &[u8]) -> bool {
    !text.is_empty()
        && text
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || extra.contains(&b))
}

/// One thing that happened, as producers hand it to the hub. Cheap to build: the hub
/// serialises it.
#[derive(Debug)]
pub enum Event {
    TaskStarted {
        id: i64,
        task: Arc<str>,
        at: i64,
        late_ms: f64,
    },
    TaskProgress {
        id: i64,
        task: Arc<str>,
        at: i64,
        fraction: Option<f64>,
        message: Box<str>,
    },
    TaskFinished {
        id: i64,
        task: Arc<str>,
        at: i64,
        duration: Duration,
    },
    TaskFailed {
        id: i64,
        task: Option<Arc<str>>,
        at: i64,
        /// `None` when the task never started (rejected).
        duration: Option<Duration>,
        /// `failed`, `panicked`, `rejected`, `timed_out` or `abandoned`.
        reason: &'static str,
        error: Box<str>,
    },
    MonitorResult(Box<RoundResult>),
}

/// Lowers the calling thread to the lowest normal priority (nice 19), so that under load
/// the scheduler runs the foreman and workers first and the live view with what is left.
/// Every live view thread calls it first thing.
///
/// Nice alone is not enough during a burst: the foreman's loop and idle workers poll with
/// `sched_yield` (src/pool.rs), and a yield hands the CPU to whichever thread is runnable,
/// nice 19 or not, for as long as that thread runs. So the live threads that do a burst's
/// work (the hub, the WebSocket thread) work in short turns and yield between them — after
/// every 64 events, after each client — giving the CPU straight back. In the fan-out
/// benchmark this took the drain's slowdown with 100 clients from 33–38% to 1–15%
/// (BENCHMARKS.md).
pub(crate) fn lower_priority() {
    // SAFETY: gettid has no preconditions; setpriority on our own thread id only lowers
    // that thread's priority, which needs no privilege.
    let rc = unsafe {
        let tid = libc::gettid();
        libc::setpriority(libc::PRIO_PROCESS, tid as libc::id_t, 19)
    };
    if rc != 0 {
        tracing::debug!(
            "live view: could not lower a thread's priority: {}",
            std::io::Error::last_os_error()
        );
    }
}

/// What the producers count themselves, for the heartbeat and `/metrics`: figures that
/// must stay right even when events are dropped. Relaxed atomics: each is a figure on its
/// own, read now and then, ordered with nothing else.
#[derive(Default)]
pub(crate) struct Tally {
    /// Events dropped because the hub was `EVENT_QUEUE` behind.
    pub dropped: AtomicU64,
    /// Tasks started and not yet ended by the workers. Counted where they run, not by the
    /// hub from events: a dropped `task.finished` cannot leave a task running here
    /// forever.
    pub running: AtomicUsize,
    /// 0 while the foreman runs; from its first stop signal, the Unix µs by which it exits
    /// whatever still runs (the heartbeat's `state` and `stop_deadline`). Set once by the
    /// foreman loop.
    pub stop_deadline: AtomicI64,
}

/// The producers' handle: cheap to clone, never blocks.
#[derive(Clone)]
pub struct Publisher {
    tx: Sender<Event>,
    tally: Arc<Tally>,
}

impl std::fmt::Debug for Publisher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Publisher")
    }
}

impl Publisher {
    pub fn publish(&self, event: Event) {
        if self.tx.try_send(event).is_err() {
            self.tally.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Counts a task running (the worker, as it publishes `task.started`).
    pub(crate) fn task_started(&self) {
        self.tally.running.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts a started task ended (the worker, as it publishes its end).
    pub(crate) fn task_ended(&self) {
        self.tally.running.fetch_sub(1, Ordering::Relaxed);
    }

    /// The foreman is stopping and exits by `deadline` (Unix µs), running tasks or not.
    pub(crate) fn stopping(&self, deadline: i64) {
        self.tally.stop_deadline.store(deadline, Ordering::Relaxed);
    }
}

/// The running live view: the hub and the acceptor. `stop` ends both and tells every
/// connected client that the foreman is stopping.
pub struct Live {
    publisher: Publisher,
    /// Set once by `stop`; read by the acceptor and the WebSocket thread.
    stopping: Arc<AtomicBool>,
    local_addr: SocketAddr,
    hub: Option<JoinHandle<()>>,
    acceptor: Option<JoinHandle<()>>,
    /// The thread serving every WebSocket; it ends once each has its close frame.
    ws: Option<JoinHandle<()>>,
    hub_stop: Sender<hub::Command>,
}

impl Live {
    /// Binds the address and starts the hub and acceptor threads.
    pub fn start(config: LiveConfig) -> Result<Live> {
        let addr = config.validate()?;
        let listener = std::net::TcpListener::bind(addr).map_err(|e| {
            Error::bad_input(
                "--http",
                format!("cannot listen on {addr} ({e}); pick a free port or another address"),
            )
        })?;
        let local_addr = listener
            .local_addr()
            .map_err(|e| Error::Runtime(format!("reading the live view's address: {e}")))?;
        if !addr.ip().is_loopback() {
            tracing::warn!(
                addr = %local_addr,
                token = config.token.is_some(),
                "the live view listens beyond this machine; anyone who can reach it sees task \
                 and monitor data{}",
                if config.token.is_some() { "" } else { " (no --http-token is set)" }
            );
        }
        let (tx, rx) = bounded(EVENT_QUEUE);
        let tally = Arc::new(Tally::default());
        let stopping = Arc::new(AtomicBool::new(false));
        let (hub, handle) = hub::Hub::start(
            rx,
            config.limits.clone(),
            config.db.clone(),
            config.workers,
            Arc::clone(&tally),
        )?;
        let commands = handle.commands.clone();
        let (server, websockets) =
            http::Server::new(config, handle, Arc::clone(&stopping), Arc::clone(&tally));
        let [acceptor, ws] = http::Server::start(listener, Arc::new(server), websockets)?;
        tracing::info!(url = %format!("http://{local_addr}/"), "live view listening");
        Ok(Live {
            publisher: Publisher { tx, tally },
            stopping,
            local_addr,
            hub: Some(hub),
            acceptor: Some(acceptor),
            ws: Some(ws),
            hub_stop: commands,
        })
    }

    pub fn publisher(&self) -> Publisher {
        self.publisher.clone()
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Stops accepting, closes every client with "the foreman is stopping", ends the hub.
    pub fn stop(mut self) {
        self.stop_now();
    }

    fn stop_now(&mut self) {
        self.stopping.store(true, Ordering::SeqCst);
        let _ = self.hub_stop.send(hub::Command::Stop);
        // The acceptor sits in accept(): a connection of our own wakes it to see the flag.
        let _ = std::net::TcpStream::connect_timeout(&self.local_addr, Duration::from_secs(1));
        for handle in [self.acceptor.take(), self.hub.take(), self.ws.take()]
            .into_iter()
            .flatten()
        {
            let _ = handle.join();
        }
    }
}

impl Drop for Live {
    fn drop(&mut self) {
        if self.hub.is_some() || self.acceptor.is_some() || self.ws.is_some() {
            self.stop_now();
        }
    }
}
