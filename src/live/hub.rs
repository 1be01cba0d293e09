//! The hub: one thread that owns every channel's history and every client's subscription
//! (the flow is drawn in src/live/mod.rs).
//!
//! Everything here is touched by the hub thread alone, except `Counters`, which the hub
//! updates and `/metrics` reads under one mutex held for a few field updates or one
//! rendering, never across I/O, the feed (src/live/feed.rs), which has its own, and the
//! producers' `Tally` (atomics the hub only reads).
//! Because subscriptions and messages are handled by this one thread in one order, a
//! subscriber gets a channel's history and then every later message of it, with no gap and
//! no duplicate.

use std::collections::VecDeque;
use std::collections::hash_map::Entry;
use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender, select, unbounded};
use foldhash::{HashMap, HashMapExt, HashSet, HashSetExt};
use parking_lot::Mutex;
use serde::Serialize;
use tungstenite::Bytes;

use super::feed::{Block, Feed, text_frame};
use super::metrics::{Counters, SERIES_SAMPLES, Sample, TaskCounts};
use super::{Event, Tally};
use crate::clock::{format_micros, now_micros};
use crate::db::{self, Synchronous};
use crate::error::{Error, Result};
use crate::pool::round_ms;
use crate::telemetry::ProcStat;

/// The caps that bound the live view's memory, and the retention of finished channels.
#[derive(Debug, Clone)]
pub struct Limits {
    /// How long a channel is kept after its final message (a task's `task.finished` or
    /// `task.failed`, a monitor's latest result).
    pub retention: Duration,
    /// The most channels kept; past it the channel that ended first goes.
    pub max_channels: usize,
    /// The most messages one channel keeps; past it the oldest go (a task channel keeps its
    /// `task.started`).
    pub max_channel_messages: usize,
    /// The most messages kept over all channels; past it whole channels go, oldest ended
    /// first.
    pub max_messages: usize,
    /// The feed's length: how many messages a client may fall behind the newest before
    /// it is disconnected (every client's queue is its stretch of this one ring).
    pub client_queue: usize,
    /// The most connections served at once (page loads, API calls and WebSockets).
    pub max_connections: usize,
    /// A WebSocket client silent this long is pinged, and dropped if it is silent as long
    /// again (src/live/ws.rs, `check_idle`).
    pub ping_interval: Duration,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            retention: Duration::from_secs(300),
            max_channels: 2_000,
            max_channel_messages: 1_000,
            max_messages: 10_000,
            client_queue: 10_000,
            max_connections: 128,
            ping_interval: Duration::from_secs(30),
        }
    }
}

/// The hub's answer to a subscription: what it newly subscribed, the history to send
/// first, and the feed position from which those channels' live messages follow it.
pub(crate) struct Subscribed {
    /// `*` was granted now (it was not before).
    pub all: bool,
    /// Channels newly subscribed (none once `*` is).
    pub added: Vec<String>,
    /// The channels' kept messages as frames, in the hub's order.
    pub replay: Vec<Bytes>,
    pub from: u64,
}

/// What the WebSocket thread (and `Live::stop`) tell the hub.
pub(crate) enum Command {
    /// Subscribe (more) channels; the first subscription registers the client.
    Subscribe {
        client: u64,
        channels: Vec<String>,
        reply: Sender<Subscribed>,
    },
    /// The client's connection ended.
    Leave {
        client: u64,
    },
    Stop,
}

/// What the HTTP side holds of the hub.
#[derive(Clone)]
pub(crate) struct HubHandle {
    pub commands: Sender<Command>,
    pub counters: Arc<Mutex<Counters>>,
    pub feed: Arc<Feed>,
}

/// How long the hub lets events gather after handling some (see `run`).
const GATHER: Duration = Duration::from_millis(2);

/// The most events handled before the hub looks at its commands again.
const EVENT_BATCH: usize = 4096;

/// The hub gives up its CPU after this many events (see `super::lower_priority`).
const YIELD_EVERY: usize = 64;

/// The most task waits kept for one chart sample's percentile.
const MAX_WAITS: usize = 10_000;

/// How often the hub publishes a heartbeat and forgets expired channels.
const TICK: Duration = Duration::from_secs(1);

/// The channel heartbeats go to (SPEC: every message names a channel).
const FOREMAN_CHANNEL: &str = "foreman";

/// A channel's identity: a task's by its id (a burst's events then build and hash no
/// name), any other by its name.
#[derive(Clone, PartialEq, Eq, Hash)]
enum Key {
    Task(i64),
    Named(Arc<str>),
}

impl Key {
    /// The key of a channel name as a client writes it: `task:<id>` is a task's when the id
    /// is written as the hub writes it (`task:7`, not `task:07`: that one never has
    /// messages, as before).
    fn of(name: &str) -> Key {
        if let Some(id) = name
            .strip_prefix("task:")
            .and_then(|digits| digits.parse::<i64>().ok())
            .filter(|id| itoa::Buffer::new().format(*id) == &name["task:".len()..])
        {
            return Key::Task(id);
        }
        Key::Named(Arc::from(name))
    }
}

impl fmt::Display for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Key::Task(id) => write!(f, "task:{id}"),
            Key::Named(name) => f.write_str(name),
        }
    }
}

struct Stored {
    /// Position in the hub's overall order, for replaying many channels in order.
    global: u64,
    /// Its number within its channel.
    seq: u64,
    body: Body,
}

/// A kept message: framed when some client wanted it as it came, else as it came and
/// framed only if a subscription replays it. During a burst with no one watching (or
/// after slow clients were cut off) the hub then keeps the histories without rendering
/// a single message.
enum Body {
    /// The message as a WebSocket frame.
    Frame(Bytes),
    Unsent(Message),
}

/// What a message says, before it is rendered as JSON.
enum Message {
    Event(Event),
    Heartbeat(Box<Heartbeat>),
}

impl Message {
    /// The message as a WebSocket text frame, with its envelope.
    fn frame(&self, channel: &str, seq: u64) -> serde_json::Result<Vec<u8>> {
        let text = match self {
            Message::Heartbeat(payload) => envelope("heartbeat", channel, seq, &**payload)?,
            Message::Event(Event::MonitorResult(result)) => {
                let payload = MonitorPayload {
                    summary: result.summary(),
                    result,
                };
                envelope("monitor.result", channel, seq, &payload)?
            }
            Message::Event(event) => {
                let (kind, payload) = task_payload(event);
                envelope(kind, channel, seq, &payload)?
            }
        };
        Ok(text_frame(text))
    }
}

/// A task event's type and payload.
fn task_payload(event: &Event) -> (&'static str, TaskPayload<'_>) {
    match event {
        Event::TaskStarted {
            id,
            task,
            at,
            late_ms,
        } => (
            "task.started",
            TaskPayload {
                id: *id,
                task: Some(task),
                at: format_micros(*at),
                late_ms: Some(*late_ms),
                ..TaskPayload::default()
            },
        ),
        Event::TaskProgress {
            id,
            task,
            at,
            fraction,
            message,
        } => (
            "task.progress",
            TaskPayload {
                id: *id,
                task: Some(task),
                at: format_micros(*at),
                fraction: *fraction,
                message: Some(message),
                ..TaskPayload::default()
            },
        ),
        Event::TaskFinished {
            id,
            task,
            at,
            duration,
        } => (
            "task.finished",
            TaskPayload {
                id: *id,
                task: Some(task),
                at: format_micros(*at),
                duration_ms: Some(round_ms(*duration)),
                ..TaskPayload::default()
            },
        ),
        Event::TaskFailed {
            id,
            task,
            at,
            duration,
            reason,
            error,
        } => (
            "task.failed",
            TaskPayload {
                id: *id,
                task: task.as_deref(),
                at: format_micros(*at),
                duration_ms: duration.map(round_ms),
                reason: Some(reason),
                error: Some(error),
                ..TaskPayload::default()
            },
        ),
        // Not a task event; `Message::frame` renders it.
        Event::MonitorResult(_) => ("monitor.result", TaskPayload::default()),
    }
}

struct Channel {
    /// Its name as the feed and the envelope carry it, made when first needed.
    name: Option<Arc<str>>,
    seq: u64,
    messages: VecDeque<Stored>,
    /// When and with which message (its `global`) the channel last ended, if it did.
    ended: Option<(Instant, u64)>,
    /// Keeps its first message when trimmed (a task's `task.started`).
    keeps_first: bool,
    /// Keeps only this many messages (the heartbeat channel keeps the latest).
    cap: usize,
}

impl Channel {
    fn name(&mut self, key: &Key) -> Arc<str> {
        let name = self.name.get_or_insert_with(|| match key {
            Key::Named(name) => Arc::clone(name),
            Key::Task(_) => Arc::from(key.to_string()),
        });
        Arc::clone(name)
    }

    /// Frames the messages kept as they came, for a replay (once: they stay framed).
    fn render(&mut self, key: &Key) {
        let name = self.name(key);
        for stored in &mut self.messages {
            if let Body::Unsent(message) = &stored.body {
                match message.frame(&name, stored.seq) {
                    Ok(frame) => stored.body = Body::Frame(Bytes::from(frame)),
                    Err(e) => {
                        tracing::warn!("live view: cannot serialise a message of {name}: {e}")
                    }
                }
            }
        }
    }
}

/// What a client has subscribed, as far as replays and rendering need to know.
struct Client {
    all: bool,
    channels: HashSet<Key>,
}

pub(crate) struct Hub {
    events: Receiver<Event>,
    commands: Receiver<Command>,
    limits: Limits,
    db: PathBuf,
    /// Opened at the first heartbeat; `None` again after an error (reopened next tick).
    conn: Option<rusqlite::Connection>,
    workers: usize,
    /// The producers' own figures (src/live/mod.rs, `Tally`).
    tally: Arc<Tally>,
    channels: HashMap<Key, Channel>,
    /// Channels in the order they ended, each with the `global` of its ending message; an
    /// entry whose channel has ended again since, or is gone, is stale and skipped.
    ended: VecDeque<(Key, u64)>,
    /// Messages kept over all channels.
    kept: usize,
    /// The position the next message gets, in `channels` and in the feed alike.
    next_global: u64,
    clients: HashMap<u64, Client>,
    /// Clients on `*`.
    all_clients: usize,
    /// Channels some client subscribed by name, with how many did.
    watched: HashMap<Key, usize>,
    feed: Arc<Feed>,
    /// Messages published and not yet appended to the feed (appended once per turn).
    pending: Block,
    /// `FOREMAN_CHANNEL`, made once.
    foreman_channel: Arc<str>,
    counters: Arc<Mutex<Counters>>,
    /// Since the last heartbeat, for the charts' sample: tasks finished, failed, and the
    /// waits (`late_ms`) of the tasks started (at most `MAX_WAITS`; past it, every other
    /// one is kept, which leaves the percentile as it was).
    tick_finished: u64,
    tick_failed: u64,
    tick_waits: Vec<f64>,
    last_sample: Instant,
    started: Instant,
    /// CPU ticks and wall time at the previous heartbeat, for the CPU share.
    last_cpu: Option<(Instant, u64)>,
    ticks_per_second: f64,
}

impl Hub {
    pub fn start(
        events: Receiver<Event>,
        limits: Limits,
        db: PathBuf,
        workers: usize,
        tally: Arc<Tally>,
    ) -> Result<(JoinHandle<()>, HubHandle)> {
        // Unbounded: commands come one a client's subscription or departure, from the
        // WebSocket thread (which waits for each subscription's answer), and one at stop.
        let (commands_tx, commands) = unbounded();
        let counters = Arc::new(Mutex::new(Counters::default()));
        let feed = Arc::new(Feed::new(limits.client_queue, 0).map_err(|e| {
            Error::Runtime(format!("cannot make the live view's wake-up eventfd: {e}"))
        })?);
        let mut hub = Hub {
            events,
            commands,
            limits,
            db,
            conn: None,
            workers,
            tally,
            channels: HashMap::new(),
            ended: VecDeque::new(),
            kept: 0,
            next_global: 0,
            clients: HashMap::new(),
            all_clients: 0,
            watched: HashMap::new(),
            feed: Arc::clone(&feed),
            pending: Block::default(),
            foreman_channel: Arc::from(FOREMAN_CHANNEL),
            counters: Arc::clone(&counters),
            tick_finished: 0,
            tick_failed: 0,
            tick_waits: Vec::new(),
            last_sample: Instant::now(),
            started: Instant::now(),
            last_cpu: None,
            ticks_per_second: ProcStat::ticks_per_second(),
        };
        let handle = std::thread::Builder::new()
            .name("snapq-live-hub".into())
            .spawn(move || {
                super::lower_priority();
                hub.run()
            })
            .map_err(|e| Error::Runtime(format!("cannot start the live view's hub thread: {e}")))?;
        Ok((
            handle,
            HubHandle {
                commands: commands_tx,
                counters,
                feed,
            },
        ))
    }

    fn run(&mut self) {
        let mut next_tick = Instant::now();
        loop {
            if Instant::now() >= next_tick {
                self.heartbeat();
                self.forget_expired();
                self.feed.append(&mut self.pending);
                next_tick = Instant::now() + TICK;
            }
            let timeout = next_tick.saturating_duration_since(Instant::now());
            select! {
                recv(self.events) -> event => {
                    let Ok(event) = event else { return self.stop() };
                    self.on_event(event);
                    // Take what else is waiting before looking at commands again.
                    for n in 1..=EVENT_BATCH {
                        match self.events.try_recv() {
                            Ok(event) => self.on_event(event),
                            Err(_) => break,
                        }
                        if n % YIELD_EVERY == 0 {
                            std::thread::yield_now();
                        }
                    }
                    // Let more gather before looking again: while events keep coming, the
                    // hub is then never parked on the channel, so a producer's try_send
                    // never has to wake it (a system call on the worker's time).
                    std::thread::sleep(GATHER);
                }
                recv(self.commands) -> command => match command {
                    Ok(Command::Stop) | Err(_) => return self.stop(),
                    Ok(command) => self.on_command(command),
                },
                default(timeout) => {}
            }
            self.feed.append(&mut self.pending);
        }
    }

    /// Readers of the feed end, closing with "stopping".
    fn stop(&mut self) {
        self.feed.append(&mut self.pending);
        self.feed.stop();
    }

    fn on_command(&mut self, command: Command) {
        match command {
            Command::Subscribe {
                client,
                channels,
                reply,
            } => self.subscribe(client, channels, &reply),
            Command::Leave { client } => {
                if let Some(client) = self.clients.remove(&client) {
                    if client.all {
                        self.all_clients -= 1;
                    }
                    for name in client.channels {
                        if let Entry::Occupied(mut watched) = self.watched.entry(name) {
                            *watched.get_mut() -= 1;
                            if *watched.get() == 0 {
                                watched.remove();
                            }
                        }
                    }
                }
                self.counters.lock().clients = self.clients.len();
            }
            Command::Stop => self.stop(),
        }
    }

    /// Answers a subscription with what is new to this client, the history of it (in
    /// order) and the feed position its live messages continue from. All come from this
    /// thread between two messages: no gap, no duplicate. The client's thread adds exactly
    /// what it is told to its filter (src/live/ws.rs).
    fn subscribe(&mut self, id: u64, channels: Vec<String>, reply: &Sender<Subscribed>) {
        self.feed.append(&mut self.pending);
        let client = self.clients.entry(id).or_insert_with(|| Client {
            all: false,
            channels: HashSet::new(),
        });
        // The channels to replay.
        let mut replayed: Vec<Key> = Vec::new();
        // Tasks the hub keeps nothing of (ended before this foreman started, or longer ago
        // than the retention): their final state, from their records.
        let mut from_records: Vec<i64> = Vec::new();
        let mut all = false;
        let mut added = Vec::new();
        if channels.iter().any(|c| c == "*") {
            if !client.all {
                all = true;
                // Everything kept, except what this client was already sent.
                replayed.extend(
                    self.channels
                        .keys()
                        .filter(|key| !client.channels.contains(*key))
                        .cloned(),
                );
                client.all = true;
                self.all_clients += 1;
            }
        } else if !client.all {
            for name in channels {
                let key = Key::of(&name);
                if client.channels.contains(&key) {
                    continue;
                }
                if self.channels.contains_key(&key) {
                    replayed.push(key.clone());
                } else if let Key::Task(task) = key {
                    from_records.push(task);
                }
                client.channels.insert(key.clone());
                *self.watched.entry(key).or_default() += 1;
                added.push(name);
            }
        }
        let from_records: Vec<Bytes> = from_records
            .into_iter()
            .filter_map(|task| self.record_frame(task))
            .collect();
        let mut replay: Vec<(u64, Bytes)> = Vec::new();
        for key in replayed {
            if let Some(channel) = self.channels.get_mut(&key) {
                channel.render(&key);
                replay.extend(channel.messages.iter().filter_map(|m| match &m.body {
                    Body::Frame(frame) => Some((m.global, frame.clone())),
                    Body::Unsent(_) => None,
                }));
            }
        }
        replay.sort_unstable_by_key(|(global, _)| *global);
        let _ = reply.try_send(Subscribed {
            all,
            added,
            replay: from_records
                .into_iter()
                .chain(replay.into_iter().map(|(_, frame)| frame))
                .collect(),
            from: self.next_global,
        });
        self.counters.lock().clients = self.clients.len();
    }

    fn on_event(&mut self, event: Event) {
        let (id, ends) = match &event {
            Event::TaskStarted {
                id, task, late_ms, ..
            } => {
                self.count(task, |c| c.started += 1);
                if self.tick_waits.len() >= MAX_WAITS {
                    let mut n = 0;
                    self.tick_waits.retain(|_| {
                        n += 1;
                        n % 2 == 0
                    });
                }
                self.tick_waits.push(*late_ms);
                (*id, false)
            }
            Event::TaskProgress { id, .. } => (*id, false),
            Event::TaskFinished {
                id, task, duration, ..
            } => {
                self.count(task, |c| c.finished(*duration));
                self.tick_finished += 1;
                (*id, true)
            }
            Event::TaskFailed {
                id, task, duration, ..
            } => {
                self.tick_failed += 1;
                let failed = |c: &mut TaskCounts| c.failed(duration.unwrap_or_default());
                match task {
                    Some(task) => self.count(task, failed),
                    // A row naming a task this foreman does not know.
                    None => self.count(&Arc::from("?"), failed),
                }
                (*id, true)
            }
            Event::MonitorResult(result) => {
                self.counters.lock().monitor(result);
                let key = Key::Named(Arc::from(format!("monitor:{}", result.monitor)));
                self.publish(key, Message::Event(event), true);
                return;
            }
        };
        self.publish(Key::Task(id), Message::Event(event), ends);
    }

    /// Updates a task's counters.
    fn count(&self, task: &Arc<str>, update: impl FnOnce(&mut TaskCounts)) {
        update(self.counters.lock().task(task));
    }

    /// Whether a client would take a message of this channel now.
    fn wanted(&self, key: &Key) -> bool {
        self.all_clients > 0 || (!self.watched.is_empty() && self.watched.contains_key(key))
    }

    /// Numbers and keeps one message, and queues it for the feed: framed if a client wants
    /// it, else as a place holder that no reader takes (`Block::skip`).
    fn publish(&mut self, key: Key, message: Message, ends: bool) {
        let wanted = self.wanted(&key);
        let global = self.next_global;
        let limits = &self.limits;
        let channel = self.channels.entry(key.clone()).or_insert_with(|| {
            let (keeps_first, cap) = match &key {
                Key::Task(_) => (true, limits.max_channel_messages.max(1)),
                Key::Named(name) if &**name == FOREMAN_CHANNEL => (false, 1),
                Key::Named(_) => (false, limits.max_channel_messages.max(1)),
            };
            Channel {
                name: None,
                seq: 0,
                messages: VecDeque::new(),
                ended: None,
                keeps_first,
                cap,
            }
        });
        let seq = channel.seq + 1;
        let body = if wanted {
            let name = channel.name(&key);
            match message.frame(&name, seq) {
                Ok(frame) => {
                    self.pending.push(name, &frame);
                    Body::Frame(Bytes::from(frame))
                }
                Err(e) => {
                    tracing::warn!("live view: cannot serialise a message of {name}: {e}");
                    return;
                }
            }
        } else {
            self.pending.skip();
            Body::Unsent(message)
        };
        // Numbered only once it exists: seq and feed positions have no holes.
        channel.seq = seq;
        self.next_global += 1;
        channel.messages.push_back(Stored { global, seq, body });
        self.kept += 1;
        if channel.messages.len() > channel.cap {
            if channel.keeps_first && channel.messages.len() > 1 {
                channel.messages.remove(1);
            } else {
                channel.messages.pop_front();
            }
            self.kept -= 1;
        }
        if ends {
            channel.ended = Some((Instant::now(), global));
            self.ended.push_back((key, global));
        }
        while self.channels.len() > self.limits.max_channels || self.kept > self.limits.max_messages
        {
            if !self.evict_one() {
                break;
            }
        }
        if self.ended.len() > 4 * self.limits.max_channels.max(1024) {
            self.compact_ended();
        }
    }

    /// Forgets one channel to stay within the caps: the one that ended first, else (all
    /// open, which only running tasks are) the open one with the oldest message.
    fn evict_one(&mut self) -> bool {
        while let Some((key, global)) = self.ended.pop_front() {
            if self.remove_if_ended(key, global) {
                return true;
            }
        }
        let oldest = self
            .channels
            .iter()
            .filter_map(|(key, c)| c.messages.front().map(|m| (m.global, key)))
            .min_by_key(|(global, _)| *global)
            .map(|(_, key)| key.clone());
        match oldest {
            Some(key) => {
                self.remove_channel(&key);
                true
            }
            None => false,
        }
    }

    fn is_current_end(&self, key: &Key, global: u64) -> bool {
        self.channels
            .get(key)
            .and_then(|c| c.ended)
            .is_some_and(|(_, g)| g == global)
    }

    /// Removes the channel if `global` is still its ending message (one lookup: this
    /// runs for every channel evicted during a burst).
    fn remove_if_ended(&mut self, key: Key, global: u64) -> bool {
        match self.channels.entry(key) {
            Entry::Occupied(entry) if entry.get().ended.is_some_and(|(_, g)| g == global) => {
                self.kept -= entry.remove().messages.len();
                true
            }
            _ => false,
        }
    }

    fn remove_channel(&mut self, key: &Key) {
        if let Some(channel) = self.channels.remove(key) {
            self.kept -= channel.messages.len();
        }
    }

    fn compact_ended(&mut self) {
        let ended = std::mem::take(&mut self.ended);
        self.ended = ended
            .into_iter()
            .filter(|(key, global)| self.is_current_end(key, *global))
            .collect();
    }

    /// Forgets channels whose final message is older than the retention.
    fn forget_expired(&mut self) {
        let now = Instant::now();
        while let Some((key, global)) = self.ended.front() {
            let expired = match self.channels.get(key).and_then(|c| c.ended) {
                Some((at, g)) if g == *global => now.duration_since(at) >= self.limits.retention,
                // Stale: ended again later, or gone.
                _ => true,
            };
            if !expired {
                break;
            }
            let Some((key, global)) = self.ended.pop_front() else {
                break;
            };
            self.remove_if_ended(key, global);
        }
        let mut counters = self.counters.lock();
        counters.channels = self.channels.len();
        counters.messages = self.kept;
    }

    fn heartbeat(&mut self) {
        let now = now_micros();
        let tasks = self.queue_figures(now);
        let stat = ProcStat::read_self();
        let cpu_percent = stat.as_ref().and_then(|s| {
            let ticks = s.utime_ticks + s.stime_ticks;
            let at = Instant::now();
            let previous = self.last_cpu.replace((at, ticks));
            previous.map(|(then, before)| {
                let wall = at.duration_since(then).as_secs_f64().max(1e-3);
                let cpu = ticks.saturating_sub(before) as f64 / self.ticks_per_second;
                (cpu / wall * 1000.0).round() / 10.0
            })
        });
        let stop_deadline =
            Some(self.tally.stop_deadline.load(Ordering::Relaxed)).filter(|&t| t > 0);
        let chart = self.sample(now, tasks.as_ref().map(|t| t.due));
        let payload = Box::new(Heartbeat {
            chart,
            at: format_micros(now),
            pid: std::process::id(),
            uptime_seconds: self.started.elapsed().as_secs(),
            rss_bytes: stat.as_ref().map(|s| s.rss_bytes),
            threads: stat.as_ref().map(|s| s.threads),
            cpu_percent,
            workers: self.workers,
            running: self.tally.running.load(Ordering::Relaxed),
            state: if stop_deadline.is_some() {
                "stopping"
            } else {
                "running"
            },
            stop_deadline: stop_deadline.map(format_micros),
            tasks,
            clients: self.clients.len(),
            events_dropped: self.tally.dropped.load(Ordering::Relaxed),
        });
        let key = Key::Named(Arc::clone(&self.foreman_channel));
        self.publish(key, Message::Heartbeat(payload), false);
    }

    /// The charts' point for the interval since the last one, kept in `Counters::series`.
    fn sample(&mut self, now: i64, due: Option<i64>) -> Sample {
        let elapsed = self.last_sample.elapsed().as_secs_f64().max(1e-3);
        self.last_sample = Instant::now();
        let rate = |n: u64| (n as f64 / elapsed * 100.0).round() / 100.0;
        // Nearest rank, as `snapq stats` computes it.
        let wait_p95_ms = crate::stats::Summary::of(&mut self.tick_waits).map(|s| s.p95);
        let sample = Sample {
            at_ms: now / 1000,
            finished_per_second: rate(std::mem::take(&mut self.tick_finished)),
            failed_per_second: rate(std::mem::take(&mut self.tick_failed)),
            due,
            wait_p95_ms,
        };
        self.tick_waits.clear();
        let mut counters = self.counters.lock();
        if counters.series.len() >= SERIES_SAMPLES {
            counters.series.pop_front();
        }
        counters.series.push_back(sample);
        sample
    }

    /// A task's final state from its record, as the one message of its channel: type
    /// `task.finished` (succeeded) or `task.failed` (any other end, its state as the
    /// reason), with `"record": true` and `seq` 0. `None` for a task with no record, or
    /// one still queued or running (its live messages will come).
    fn record_frame(&mut self, id: i64) -> Option<Bytes> {
        let conn = self.connection()?;
        let record = match crate::records::show(conn, id) {
            Ok(record) => record?,
            Err(e) => {
                tracing::warn!("live view: cannot read the record of task {id}: {e}");
                self.conn = None;
                return None;
            }
        };
        if matches!(record.state.as_str(), "queued" | "running") {
            return None;
        }
        let succeeded = record.state == "succeeded";
        let payload = RecordPayload {
            id,
            task: &record.task,
            at: record.finished_at.as_deref(),
            duration_ms: record.duration_seconds.map(|s| (s * 1e6).round() / 1e3),
            reason: (!succeeded).then_some(record.state.as_str()),
            error: record.error.as_deref(),
            state: &record.state,
            record: true,
        };
        let kind = if succeeded {
            "task.finished"
        } else {
            "task.failed"
        };
        match envelope(kind, &Key::Task(id).to_string(), 0, &payload) {
            Ok(text) => Some(Bytes::from(text_frame(text))),
            Err(e) => {
                tracing::warn!("live view: cannot render the record of task {id}: {e}");
                None
            }
        }
    }

    /// The hub's database connection, opened on first use and again after an error.
    fn connection(&mut self) -> Option<&rusqlite::Connection> {
        if self.conn.is_none() {
            match db::open(&self.db, Synchronous::Normal) {
                Ok(conn) => self.conn = Some(conn),
                Err(e) => {
                    tracing::warn!("live view: cannot open the database: {e}");
                    return None;
                }
            }
        }
        self.conn.as_ref()
    }

    fn queue_figures(&mut self, now: i64) -> Option<QueueFigures> {
        let conn = self.connection()?;
        match crate::queue::counts(conn, now) {
            Ok(counts) => Some(QueueFigures {
                due: counts.due,
                delayed: counts.delayed,
                oldest_due_age_seconds: counts.oldest_due.map(|t| (now - t).max(0) as f64 / 1e6),
            }),
            Err(e) => {
                tracing::warn!("live view: cannot count the queue: {e}");
                self.conn = None;
                None
            }
        }
    }
}

/// `{"type":…,"channel":…,"seq":…, <the payload's fields>}`, as UTF-8 JSON written into
/// one buffer (no string a field).
fn envelope(
    kind: &str,
    channel: &str,
    seq: u64,
    payload: &impl Serialize,
) -> serde_json::Result<Vec<u8>> {
    let mut text = Vec::with_capacity(channel.len() + 192);
    text.extend_from_slice(b"{\"type\":");
    serde_json::to_writer(&mut text, kind)?;
    text.extend_from_slice(b",\"channel\":");
    serde_json::to_writer(&mut text, channel)?;
    text.extend_from_slice(b",\"seq\":");
    text.extend_from_slice(itoa::Buffer::new().format(seq).as_bytes());
    // The payload is an object: its opening brace becomes the comma before its fields
    // (or, with none, the envelope's closing brace).
    let start = text.len();
    serde_json::to_writer(&mut text, payload)?;
    if text[start..] == *b"{}" {
        text.truncate(start);
        text.push(b'}');
    } else {
        text[start] = b',';
    }
    Ok(text)
}

#[derive(Serialize, Default)]
struct TaskPayload<'a> {
    id: i64,
    #[serde(skip_serializing_if = "Option::is_none")]
    task: Option<&'a str>,
    at: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    late_ms: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    fraction: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    message: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    duration_ms: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    reason: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<&'a str>,
}

/// A task's final state read from its record (`Hub::record_frame`).
#[derive(Serialize)]
struct RecordPayload<'a> {
    id: i64,
    task: &'a str,
    at: Option<&'a str>,
    duration_ms: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    reason: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<&'a str>,
    state: &'a str,
    record: bool,
}

#[derive(Serialize)]
struct MonitorPayload<'a> {
    #[serde(flatten)]
    result: &'a crate::monitor::RoundResult,
    /// One line for the page, as `snapq monitor list` shows it.
    summary: String,
}

#[derive(Serialize)]
struct QueueFigures {
    due: i64,
    delayed: i64,
    oldest_due_age_seconds: Option<f64>,
}

#[derive(Serialize)]
struct Heartbeat {
    /// This second's point of the page's charts (also kept for `/api/series`).
    chart: Sample,
    at: String,
    pid: u32,
    uptime_seconds: u64,
    rss_bytes: Option<u64>,
    threads: Option<u64>,
    cpu_percent: Option<f64>,
    workers: usize,
    running: usize,
    /// "running", or "stopping" from the first stop signal on.
    state: &'static str,
    /// While stopping: when the foreman exits whatever still runs.
    #[serde(skip_serializing_if = "Option::is_none")]
    stop_deadline: Option<String>,
    tasks: Option<QueueFigures>,
    clients: usize,
    events_dropped: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_task_channel_is_keyed_by_its_id_when_written_as_the_hub_writes_it() {
        assert!(matches!(Key::of("task:42"), Key::Task(42)));
        assert!(matches!(Key::of("task:-3"), Key::Task(-3)));
        for other in [
            "task:042",
            "task:+42",
            "task:",
            "task:x",
            "monitor:n1",
            "foreman",
        ] {
            let key = Key::of(other);
            assert!(
                matches!(&key, Key::Named(name) if &**name == other),
                "{other}"
            );
            assert_eq!(key.to_string(), other);
        }
        assert_eq!(Key::Task(42).to_string(), "task:42");
    }

    #[test]
    fn the_envelope_puts_type_channel_and_seq_first() {
        let payload = TaskPayload {
            id: 7,
            task: Some("noop"),
            at: "t".into(),
            ..TaskPayload::default()
        };
        let text =
            String::from_utf8(envelope("task.started", "task:7", 3, &payload).unwrap()).unwrap();
        assert_eq!(
            text,
            r#"{"type":"task.started","channel":"task:7","seq":3,"id":7,"task":"noop","at":"t"}"#
        );
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["seq"], 3);
        let bare = envelope("heartbeat", "foreman", 1, &serde_json::json!({})).unwrap();
        assert_eq!(bare, br#"{"type":"heartbeat","channel":"foreman","seq":1}"#);
    }
}
