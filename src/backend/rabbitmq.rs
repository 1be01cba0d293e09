//! The RabbitMQ backend: foremen on several machines consume one queue on one broker.
//!
//! Topology, for the queue name N (`--queue-name`, default `snapq.tasks`):
//! - `N`: the tasks, a durable quorum queue. Its delivery limit dead-letters a message
//!   handed out `DELIVERY_LIMIT` times without an ack (a task that kills every foreman that
//!   runs it) to `N.dead`.
//! - `N.dead`: tasks whose last attempt failed, and such poison messages, for a person.
//! - the delay ladder: `LEVELS` topic exchanges `N.delay.P` and classic queues `N.delay.P`
//!   whose messages expire after 2^P seconds. A delayed message is published to the top
//!   exchange with a routing key that spells its delay in binary, most significant bit
//!   first; exchange P routes it to queue P if bit P is set, else on to exchange P - 1; a
//!   message that expires from queue P dead-letters into exchange P - 1 (queue 0 into `N`).
//!   So a delay of D seconds waits in one queue per set bit of D, and a queue holds only
//!   messages of one TTL: per-message TTLs would expire only at the head of the queue.
//!   (kombu's native delayed delivery works this way.)
//!
//! Delivery: the foreman consumes `N` with a prefetch of 8 deliveries a worker, or one
//! more than its workers while its tasks take long (`prefetch_for`). An at-most-once
//! task is acknowledged, and the broker has answered a method sent after the acks (an ack
//! has no reply of its own), before it runs: a foreman that dies later loses it. An
//! at-least-once task stays unacknowledged while it runs (its lease); success acks it; a
//! failure publishes its next attempt into the ladder (confirmed), then acks; its last
//! failure publishes it to `N.dead`. A foreman that dies, or loses its connection, leaves
//! its leases to the broker, which hands them out again: a redelivered message counts as
//! its next attempt. Such a redelivered at-least-once task is a suspect (its holder may
//! have died of it) and runs with nothing else held (`claim`), since RabbitMQ 3.10 counts
//! every delivery a dying consumer held toward the delivery limit; a foreman of the same
//! home reads from its records which attempt died, and after the last one moves the task
//! to `N.dead` instead of running it (`bury`).
//!
//! - `N.events`: a topic exchange on which each foreman publishes the ends of the tasks it
//!   ran (batched, not awaited: `tell`), and a stream queue of the same name that keeps
//!   them for `EVENTS_KEPT`.
//!
//! Each foreman keeps the records of the tasks it ran in its home's database, as with
//! SQLite: `show` and `history` answer for this machine, and `show` of a task another
//! machine ran reads its end from the stream (`recorded_elsewhere`).

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::Arc;
use std::task::{Context, Wake, Waker};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender, bounded};
use rusqlite::Connection;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::{Capabilities, Lease, QueueBackend, unsupported};
use crate::clock::now_micros;
use crate::db::{self, Synchronous};
use crate::error::{Error, Result};
use crate::queue::{Claimed, Counts, NewTask, When};
use crate::rabbitmq::{
    Acks, ArgValue, Backoff, Broker, Confirmed, Deliveries, Incoming, args, redact,
};
use crate::records::{self, Cancelled, Claimer, Finish, LeaseEnd, Orphan, Record};
use crate::registry::RetryPolicy;

/// Rungs of the delay ladder: delays up to 2^25 - 1 s (388 days).
pub const LEVELS: u32 = 25;

/// Deliveries of one message without an ack before the broker dead-letters it. RabbitMQ
/// 3.10 counts every return (a nack, a foreman's death, a closed channel), so the limit
/// leaves room for restarts.
pub const DELIVERY_LIMIT: i64 = 50;

/// Deliveries a consumer holds per worker. A claim takes only as many as there are free
/// workers; the rest wait unacknowledged in the foreman (the broker hands them to another
/// foreman if this one dies, and `stop_taking` gives them back at SIGTERM). With only the
/// free slots' worth, each claim waited for the broker to send the next deliveries: 820
/// noops a second against 6,500 with 8 a worker (BENCHMARKS.md). The price would be that a
/// foreman busy with long tasks holds up to this many waiting ones that an idle foreman
/// could run: so a foreman whose tasks take `LONG_TASK` or more lately holds only one
/// more than its workers (`prefetch_for`), and goes back to this below `SHORT_TASK`.
pub const PREFETCH_PER_WORKER: u16 = 8;

/// A typical task (a moving average of the last few) this long makes the prefetch small.
const LONG_TASK: Duration = Duration::from_millis(100);

/// A typical task shorter than this makes it large again (between the two it stays).
const SHORT_TASK: Duration = Duration::from_millis(20);

/// The prefetch of a consumer of `workers` workers, for long tasks or short ones. With long
/// ones, one delivery beside a delivery a worker: at-least-once leases stay unacknowledged
/// while they run and count against it, and a worker that frees up finds a task at once.
fn prefetch_for(workers: u16, long: bool) -> u16 {
    if long {
        workers.saturating_add(1)
    } else {
        workers.saturating_mul(PREFETCH_PER_WORKER)
    }
}

/// How long a publish may wait for the broker's confirms.
const CONFIRM_TIMEOUT: Duration = Duration::from_secs(30);

/// The default queue name (`--queue-name`).
pub const DEFAULT_QUEUE_NAME: &str = "snapq.tasks";

/// A task as it travels: JSON, persistent.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Message {
    id: i64,
    task: String,
    #[serde(default = "empty_array")]
    args: Value,
    #[serde(default = "empty_object")]
    kwargs: Value,
    /// Unix µs.
    enqueued_at: i64,
    /// Unix µs.
    due_at: i64,
    #[serde(default = "first")]
    attempt: i64,
    /// In `N.dead`: why it is there.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    error: Option<String>,
}

impl Message {
    /// A task as a row of the database holds it (its arguments as JSON text), to travel:
    /// the pair of times is when it was enqueued and when it is due (Unix µs).
    fn of_row(
        id: i64,
        task: &str,
        (args, kwargs): (&str, &str),
        (enqueued_at, due_at): (i64, i64),
        attempt: i64,
    ) -> Message {
        Message {
            id,
            task: task.to_owned(),
            args: serde_json::from_str(args).unwrap_or_else(|_| empty_array()),
            kwargs: serde_json::from_str(kwargs).unwrap_or_else(|_| empty_object()),
            enqueued_at,
            due_at,
            attempt,
            error: None,
        }
    }
}

/// Ends of tasks as one foreman published them on the events exchange `N.events` (the ends
/// one claim or flush wrote into its records, in one message), so that `show` can answer
/// on any machine. The stream queue `N.events` keeps them `EVENTS_KEPT`.
#[derive(Debug, Serialize, Deserialize)]
struct Outcomes {
    host: String,
    pid: u32,
    outcomes: Vec<Outcome>,
}

/// One task's end, as its record says it.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Outcome {
    id: i64,
    task: String,
    state: String,
    attempt: i64,
    /// Unix µs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    started_at: Option<i64>,
    /// Unix µs.
    finished_at: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    error: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    exit_code: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    signal: Option<String>,
}

/// How long the stream `N.events` keeps outcomes (its `x-max-age`): as long as the
/// records' default retention.
const EVENTS_KEPT: &str = "7D";

/// Outcomes a busy foreman publishes in one message at most, and how often (`tell`).
const TELL_BATCH: usize = 1024;
const TELL_EVERY: Duration = Duration::from_millis(250);

/// How long `show` waits for more of the stream before it takes it as read to its end.
const STREAM_IDLE: Duration = Duration::from_millis(500);

fn empty_array() -> Value {
    Value::Array(Vec::new())
}

fn empty_object() -> Value {
    Value::Object(Default::default())
}

fn first() -> i64 {
    1
}

/// A connection and what this handle does on it.
struct Link {
    broker: Broker,
    /// Deliveries of our consumer, once it consumes, and its tag.
    deliveries: Option<Deliveries>,
    /// Which connection of this handle it is: a delivery is acknowledged only on the
    /// connection that brought it.
    generation: u64,
    /// Whether this connection has declared the delay ladder: the first publish through
    /// it does (`publish`), or a consumer's count.
    ladder_declared: bool,
}

/// Wakes the foreman's loop (a token on the wake-up channel, capacity one) when lapin's
/// I/O loop receives a delivery for our consumer.
struct WakeLoop(Sender<()>);

impl Wake for WakeLoop {
    fn wake(self: Arc<Self>) {
        let _ = self.0.try_send(());
    }
}

/// An at-least-once task running under this foreman: its delivery is its lease.
struct Held {
    incoming: Incoming,
    message: Message,
    generation: u64,
}

pub struct RabbitQueue {
    url: String,
    name: String,
    link: Option<Link>,
    generation: u64,
    /// When a lost connection may be tried again.
    retry_at: Instant,
    backoff: Backoff,
    /// A consumer's prefetch (`prefetch_for`); None for a producer.
    prefetch: Option<u16>,
    /// A consumer's workers, and how long its tasks take lately (a moving average of the
    /// last few, None before the first), which sets the prefetch (`adapt_prefetch`).
    workers: u16,
    typical_task: Option<Duration>,
    /// A token per delivery and per connection error (capacity one: "look").
    wake_tx: Sender<()>,
    wake_rx: Receiver<()>,
    /// The home's database, where this machine's records live (a consumer's).
    books: Option<Connection>,
    claimer: Claimer,
    finished: Vec<Finish>,
    held: HashMap<i64, Held>,
    /// Polls the consumer's deliveries on behalf of the loop: wakes it with a token on
    /// `wake_tx`.
    waker: Waker,
    /// Tasks claimed and not ended: task name, attempt and start (Unix µs), for their
    /// outcome events.
    started: HashMap<i64, (String, i64, i64)>,
    /// Ends written into the records and not yet published (`tell`), and when outcomes
    /// were last published.
    outcomes: Vec<Outcome>,
    told_at: Instant,
    /// Whether the events stream could be declared (a consumer's, at its first connect).
    events: bool,
    /// An at-least-once task handed out again (its last holder died or lost its
    /// connection, perhaps because of it) that runs with no other delivery held and no
    /// consumer: `claim`'s comment. Cleared, and the loop woken, when it ends.
    suspect: Option<i64>,
}

impl RabbitQueue {
    /// The foreman's handle on queue `name` at `url`, for `workers` workers (it holds
    /// `PREFETCH_PER_WORKER` deliveries a worker at most, fewer with long tasks), its
    /// records in the database at `books_db`. Connects now: a broker that cannot be reached
    /// is an error (the foreman reconnects by itself later on).
    pub fn consumer(
        url: &str,
        name: &str,
        books_db: &Path,
        synchronous: Synchronous,
        workers: u16,
    ) -> Result<RabbitQueue> {
        let workers = workers.max(1);
        let mut q = RabbitQueue::new(url, name, Some(prefetch_for(workers, false)));
        q.workers = workers;
        q.books = Some(db::open(books_db, synchronous)?);
        q.connect()?;
        Ok(q)
    }

    /// An enqueuer's handle: declares the queue (tasks enqueued before any foreman starts
    /// are kept) and publishes.
    pub fn producer(url: &str, name: &str) -> Result<RabbitQueue> {
        let mut q = RabbitQueue::new(url, name, None);
        q.connect()?;
        Ok(q)
    }

    fn new(url: &str, name: &str, prefetch: Option<u16>) -> RabbitQueue {
        let (wake_tx, wake_rx) = bounded(1);
        let waker = Waker::from(Arc::new(WakeLoop(wake_tx.clone())));
        RabbitQueue {
            url: url.to_owned(),
            name: name.to_owned(),
            link: None,
            generation: 0,
            retry_at: Instant::now(),
            backoff: Backoff::new(),
            prefetch,
            workers: 0,
            typical_task: None,
            wake_tx,
            wake_rx,
            books: None,
            claimer: Claimer::this_process(),
            finished: Vec::new(),
            held: HashMap::new(),
            waker,
            started: HashMap::new(),
            outcomes: Vec::new(),
            told_at: Instant::now(),
            events: true,
            suspect: None,
        }
    }

    fn broken(&self, e: impl std::fmt::Display) -> Error {
        Error::Runtime(format!(
            "RabbitMQ at {} (queue {}): {e}; snapq connects again by itself (a foreman), or \
             try again when the broker is reachable",
            redact(&self.url),
            self.name
        ))
    }

    /// Connects and declares the queue, its dead queue and, for a consumer, the events
    /// stream. The ladder is declared by the first publish that goes through it (`publish`),
    /// producer's or consumer's: declaring its 50 queues and exchanges on a new queue name
    /// took 105 ms, which a foreman paid before its first task (BENCHMARKS.md).
    fn connect(&mut self) -> Result<()> {
        let mut broker = Broker::connect_alarmed(&self.url, Some(self.wake_tx.clone()))
            .map_err(|e| self.broken(e))?;
        if self.prefetch.is_some()
            && self.events
            && let Err(e) = declare_events(&broker, &self.name)
        {
            // A broker without streams (before RabbitMQ 3.9), or a queue of that name made
            // otherwise: the tasks run all the same, their ends stay here. The failed
            // declaration closed the channel: a new connection goes on.
            tracing::warn!(
                queue = %self.name,
                "RabbitMQ: cannot keep the events stream {}.events ({e}): tasks' ends are \
                 not published, so `snapq show` on other machines does not find them \
                 (streams need RabbitMQ 3.9 or later; a queue of that name must be a \
                 stream)",
                self.name
            );
            self.events = false;
            broker.close();
            broker = Broker::connect_alarmed(&self.url, Some(self.wake_tx.clone()))
                .map_err(|e| self.broken(e))?;
        }
        let dead = format!("{}.dead", self.name);
        broker
            .declare_queue(&dead, false, Default::default())
            .map_err(|e| self.broken(e))?;
        broker
            .declare_queue(
                &self.name,
                false,
                args(&[
                    ("x-queue-type", ArgValue::Text("quorum")),
                    ("x-delivery-limit", ArgValue::Number(DELIVERY_LIMIT)),
                    ("x-dead-letter-exchange", ArgValue::Text("")),
                    ("x-dead-letter-routing-key", ArgValue::Text(&dead)),
                ]),
            )
            .map_err(|e| self.broken(e))?;
        self.generation += 1;
        self.link = Some(Link {
            broker,
            deliveries: None,
            generation: self.generation,
            ladder_declared: false,
        });
        self.backoff.reset();
        Ok(())
    }

    /// The live connection, connecting again if it was lost and the backoff allows.
    fn link(&mut self) -> Result<&mut Link> {
        if let Some(link) = &self.link
            && let Ok(e) = link.broker.errors().try_recv()
        {
            tracing::warn!(
                queue = %self.name,
                "RabbitMQ: {e}; connecting again (tasks running keep running)"
            );
            self.drop_link();
        }
        if self.link.is_none() {
            if Instant::now() < self.retry_at {
                return Err(self.broken("not connected; connecting again shortly"));
            }
            if let Err(e) = self.connect() {
                self.retry_at = Instant::now() + self.backoff.wait();
                self.backoff.failed();
                return Err(e);
            }
            tracing::info!(queue = %self.name, "RabbitMQ: connected");
        }
        self.link
            .as_mut()
            .ok_or_else(|| Error::Runtime("the RabbitMQ connection is gone".into()))
    }

    /// Forgets the connection: the broker hands out again what it had handed us
    /// unacknowledged.
    fn drop_link(&mut self) {
        if let Some(link) = self.link.take() {
            link.broker.close();
        }
        self.retry_at = Instant::now();
    }

    /// Publishes `messages` (exchange, routing key, message) and waits for the confirms.
    fn publish(&mut self, messages: &[(String, String, Message)]) -> Result<()> {
        if messages.is_empty() {
            return Ok(());
        }
        let bodies: Vec<String> = messages
            .iter()
            .map(|(_, _, m)| serde_json::to_string(m).unwrap_or_default())
            .collect();
        let outgoing: Vec<(&str, &str, &str)> = messages
            .iter()
            .zip(&bodies)
            .map(|((x, k, _), b)| (x.as_str(), k.as_str(), b.as_str()))
            .collect();
        let name = self.name.clone();
        let needs_ladder = messages
            .iter()
            .any(|(x, _, _)| x.starts_with(&format!("{name}.delay.")));
        let link = self.link()?;
        if needs_ladder && !link.ladder_declared {
            declare_ladder(&link.broker, &name).map_err(Error::Runtime)?;
            link.ladder_declared = true;
        }
        let result = link.broker.publish_confirmed(&outgoing, CONFIRM_TIMEOUT);
        result.map_err(|e| {
            let e = self.broken(e);
            self.drop_link();
            e
        })
    }

    /// Where a message due at `due` (Unix µs) goes now: the queue, or the ladder with its
    /// delay in whole seconds, rounded up.
    fn route(&self, due: i64, now: i64) -> Result<(String, String)> {
        if due <= now {
            return Ok((String::new(), self.name.clone()));
        }
        let seconds = (due - now + 999_999) / 1_000_000;
        if seconds >= 1 << LEVELS {
            return Err(unsupported(
                "rabbitmq",
                &format!("delay a task by {seconds} s"),
                &format!(
                    "its delays go up to {} days; enqueue it nearer its time",
                    ((1i64 << LEVELS) - 1) / 86_400
                ),
            ));
        }
        Ok((
            format!("{}.delay.{}", self.name, LEVELS - 1),
            delay_key(seconds as u64),
        ))
    }

    /// The ends of at-least-once tasks, done on the broker: success acks; a failure
    /// publishes the next attempt into the ladder or the task into `N.dead`, then acks.
    /// Their records are written here; the other ends are left for `records`. Returns when
    /// the earliest task it put back is due.
    fn settle_leases(&mut self) -> Result<Option<i64>> {
        let mut requeued: Option<i64> = None;
        let mut i = 0;
        while i < self.finished.len() {
            let Some(policy) = self.finished[i].retry else {
                i += 1;
                continue;
            };
            let id = self.finished[i].id;
            let Some(held) = self.held.remove(&id) else {
                self.finished[i].retry = None;
                i += 1;
                continue;
            };
            let current = self.link.as_ref().map(|l| l.generation);
            if current != Some(held.generation) {
                // The connection that brought it is gone: the broker has it back and hands
                // it out again. Record this run as it ended.
                let f = &mut self.finished[i];
                f.retry = None;
                let note = "the connection to RabbitMQ was lost before this end reached it: \
                            the broker hands the task out again";
                f.error = Some(match f.error.take() {
                    Some(e) => format!("{e}; {note}"),
                    None => note.into(),
                });
                i += 1;
                continue;
            }
            let f = self.finished[i].clone();
            let attempt = held.message.attempt;
            let outcome = match f.state {
                "failed" | "panicked" | "timed_out" | "abandoned" => Some(records::lease_end(
                    &f,
                    &policy,
                    attempt,
                    policy.max_attempts(),
                )),
                _ => None,
            };
            let now = now_micros();
            let publish = match &outcome {
                Some(LeaseEnd::Again { due, .. }) => {
                    let (exchange, key) = self.route(*due, now)?;
                    let mut next = held.message.clone();
                    next.attempt = attempt + 1;
                    next.due_at = *due;
                    vec![(exchange, key, next)]
                }
                Some(LeaseEnd::Dead { why }) => {
                    let mut dead = held.message.clone();
                    dead.error = Some(why.clone());
                    vec![(String::new(), format!("{}.dead", self.name), dead)]
                }
                None => Vec::new(),
            };
            let acked = self.publish(&publish).and_then(|()| {
                let link = self.link()?;
                link.broker
                    .ack(&held.incoming)
                    .map_err(|e| Error::Runtime(format!("RabbitMQ: {e}")))
            });
            if let Err(e) = acked {
                // Kept for the next flush; the delivery too, if its connection lives.
                self.held.insert(id, held);
                return Err(e);
            }
            let books = self.books()?;
            match outcome {
                Some(LeaseEnd::Again { due, why }) => {
                    records::record_waiting(books, id, due, &why, f.command.as_deref())?;
                    self.finished.remove(i);
                    self.ended(&f, "queued", &why);
                    requeued = Some(requeued.map_or(due, |r| r.min(due)));
                }
                Some(LeaseEnd::Dead { why }) => {
                    records::record_dead(books, &f, &why)?;
                    self.finished.remove(i);
                    self.ended(&f, "dead", &why);
                }
                None => {
                    self.finished[i].retry = None;
                    i += 1;
                }
            }
        }
        Ok(requeued)
    }

    fn books(&self) -> Result<&Connection> {
        books_of(&self.books)
    }

    /// The outcome of end `f`, recorded as `state` with `error`.
    fn outcome(&self, f: &Finish, state: &str, error: Option<String>) -> Outcome {
        let (task, attempt, started_at) = self
            .started
            .get(&f.id)
            .map_or((String::new(), 0, None), |(t, a, s)| {
                (t.clone(), *a, Some(*s))
            });
        Outcome {
            id: f.id,
            task,
            state: state.to_owned(),
            attempt,
            started_at,
            finished_at: f.at,
            error,
            exit_code: f.command.as_ref().and_then(|c| c.exit_code),
            signal: f.command.as_ref().and_then(|c| c.signal.clone()),
        }
    }

    /// Keeps the outcome of an end written into the records as `state`, to publish.
    fn ended(&mut self, f: &Finish, state: &str, error: &str) {
        let outcome = self.outcome(f, state, Some(error.to_owned()));
        self.written(vec![outcome]);
    }

    /// The outcomes of ends about to be written by `records::claim` or `records::settle`
    /// (kept with `written` once they are).
    fn outcomes_of(&self, finished: &[Finish]) -> Vec<Outcome> {
        finished
            .iter()
            .map(|f| self.outcome(f, f.state, f.error.clone()))
            .collect()
    }

    /// Ends are in the records: their outcomes go out with the next `tell`.
    fn written(&mut self, outcomes: Vec<Outcome>) {
        for o in &outcomes {
            self.started.remove(&o.id);
        }
        self.outcomes.extend(outcomes);
    }

    /// Publishes the outcomes kept since the last call, in one message, without waiting:
    /// they are this machine's records already, and a connection that drops takes them
    /// along (`show` elsewhere then does not find them). Unless `now`, only once
    /// `TELL_BATCH` are kept or `TELL_EVERY` has passed since the last message: one message
    /// a claim halved a drain's rate (the broker writes each to the stream), so a busy
    /// foreman sends a few a second; an idle one's `flush` sends what is left.
    fn tell(&mut self, now: bool) {
        if !self.events {
            self.outcomes.clear();
            return;
        }
        if self.outcomes.is_empty()
            || !now && self.outcomes.len() < TELL_BATCH && self.told_at.elapsed() < TELL_EVERY
        {
            return;
        }
        self.told_at = Instant::now();
        let message = Outcomes {
            host: self.claimer.host.clone(),
            pid: self.claimer.pid,
            outcomes: std::mem::take(&mut self.outcomes),
        };
        let exchange = format!("{}.events", self.name);
        if let (Some(link), Ok(body)) = (&self.link, serde_json::to_vec(&message)) {
            link.broker.publish_and_go(&exchange, "outcomes", &body);
        }
    }

    /// Takes up to `limit` deliveries, starting the consumer on the first call. When none
    /// are left, the next one wakes the loop.
    fn deliveries(&mut self, limit: usize) -> Result<Vec<Incoming>> {
        let prefetch = self
            .prefetch
            .ok_or_else(|| Error::Runtime("an enqueuer's RabbitMQ handle cannot claim".into()))?;
        if self.suspect.is_some() {
            return Ok(Vec::new());
        }
        let name = self.name.clone();
        let waker = self.waker.clone();
        let link = self.link()?;
        if link.deliveries.is_none() {
            let deliveries = link
                .broker
                .consume(&name, prefetch)
                .map_err(|e| Error::Runtime(format!("RabbitMQ: {e}")))?;
            link.deliveries = Some(deliveries);
        }
        Ok(link
            .deliveries
            .as_mut()
            .map(|d| d.take(limit, &mut Context::from_waker(&waker)))
            .unwrap_or_default())
    }

    /// Cancels the consumer and gives back what it received and nobody claimed: published
    /// again to the queue, then acknowledged (a nack would mark it redelivered, which counts
    /// an attempt). The next claim consumes again. Returns how many went back.
    fn give_back_unclaimed(&mut self) -> Result<usize> {
        let Some(link) = self.link.as_mut() else {
            return Ok(0);
        };
        let Some(mut deliveries) = link.deliveries.take() else {
            return Ok(0);
        };
        link.broker
            .cancel(deliveries.tag())
            .map_err(|e| Error::Runtime(format!("RabbitMQ: {e}")))?;
        // The broker sends nothing after its answer to the cancel: what came is here.
        let unclaimed = deliveries.take(usize::MAX, &mut Context::from_waker(Waker::noop()));
        self.give_back(&unclaimed)?;
        Ok(unclaimed.len())
    }

    /// `claim`'s suspect `alone`, of `max` attempts: gives back `others` and what the
    /// consumer holds, cancelling it. A foreman of this home that died running it left the
    /// attempt in its record (as SQLite's `records::mark_lost` reads it; elsewhere the
    /// redelivery only says that it was handed out before): after the last, the task is
    /// buried (None); else it is returned to run alone, with its attempt if known.
    fn isolate(
        &mut self,
        others: &[Incoming],
        alone: Incoming,
        message: Message,
        max: i64,
    ) -> Result<Option<(Incoming, Option<i64>)>> {
        self.give_back(others)?;
        self.give_back_unclaimed()?;
        let ran = records::died_running(self.books()?, message.id)?;
        if let Some(ran) = ran.filter(|ran| *ran >= max) {
            self.bury(alone, message, ran)?;
            return Ok(None);
        }
        tracing::warn!(
            queue = %self.name,
            id = message.id,
            "RabbitMQ: a task with retries was handed out again (a foreman died or lost its \
             connection while it held it): it runs with nothing else held, in case it was \
             the cause"
        );
        Ok(Some((alone, ran.map(|ran| ran + 1))))
    }

    /// A suspect whose last attempt a foreman of this machine died running (`claim`): to
    /// `N.dead` with why (confirmed), acked, recorded `dead`; the consumer starts again at
    /// the next claim, which the loop is woken for.
    fn bury(&mut self, incoming: Incoming, message: Message, ran: i64) -> Result<()> {
        let why = format!(
            "its foreman died while attempt {ran}, its last, ran (does it kill the process \
             that runs it?)"
        );
        let id = message.id;
        let task = message.task.clone();
        let dead = Message {
            attempt: ran,
            error: Some(why.clone()),
            ..message
        };
        self.publish(&[(String::new(), format!("{}.dead", self.name), dead)])?;
        self.link()?
            .broker
            .ack(&incoming)
            .map_err(|e| Error::Runtime(format!("RabbitMQ: {e}")))?;
        let now = now_micros();
        let end = Finish {
            id,
            state: "abandoned",
            error: None,
            at: now,
            command: None,
            retry: None,
        };
        records::record_dead(self.books()?, &end, &why)?;
        tracing::warn!(queue = %self.name, id, task = %task, "RabbitMQ: {why}: moved to the dead queue");
        self.written(vec![Outcome {
            id,
            task,
            state: "dead".into(),
            attempt: ran,
            started_at: None,
            finished_at: now,
            error: Some(why),
            exit_code: None,
            signal: None,
        }]);
        self.waker.wake_by_ref();
        Ok(())
    }

    /// Publishes `unclaimed`, received on the current connection and not started, back to
    /// the queue (confirmed), then acknowledges them: they come again as new messages, not
    /// as redeliveries, which RabbitMQ would count toward the delivery limit.
    fn give_back(&mut self, unclaimed: &[Incoming]) -> Result<()> {
        if unclaimed.is_empty() {
            return Ok(());
        }
        let Some(link) = self.link.as_mut() else {
            return Err(Error::Runtime(
                "RabbitMQ: the connection that brought the tasks to give back is gone".into(),
            ));
        };
        let name = self.name.clone();
        let bodies: Vec<String> = unclaimed
            .iter()
            .map(|i| String::from_utf8_lossy(&i.body).into_owned())
            .collect();
        let outgoing: Vec<(&str, &str, &str)> = bodies
            .iter()
            .map(|b| ("", name.as_str(), b.as_str()))
            .collect();
        link.broker
            .publish_confirmed(&outgoing, CONFIRM_TIMEOUT)
            .map_err(|e| Error::Runtime(format!("RabbitMQ: {e}")))?;
        for incoming in unclaimed {
            link.broker
                .ack(incoming)
                .map_err(|e| Error::Runtime(format!("RabbitMQ: {e}")))?;
        }
        tracing::info!(
            queue = %self.name,
            tasks = unclaimed.len(),
            "gave the tasks received and not started back to the queue"
        );
        Ok(())
    }

    /// Long tasks lately and a large prefetch, or short ones and a small prefetch: the
    /// prefetch changes, which takes a new consumer (a prefetch applies to the consumers
    /// started after it); what the old one holds unclaimed goes back to the queue, for any
    /// foreman.
    fn adapt_prefetch(&mut self) -> Result<()> {
        let (Some(prefetch), Some(typical)) = (self.prefetch, self.typical_task) else {
            return Ok(());
        };
        let long = if typical >= LONG_TASK {
            true
        } else if typical < SHORT_TASK {
            false
        } else {
            return Ok(());
        };
        let want = prefetch_for(self.workers, long);
        if want == prefetch {
            return Ok(());
        }
        self.prefetch = Some(want);
        tracing::info!(
            queue = %self.name,
            prefetch = want,
            typical_task_ms = typical.as_millis() as u64,
            "RabbitMQ: tasks take {} lately: holding up to {want} deliveries",
            if long { "long" } else { "little time" }
        );
        self.give_back_or_close().map(drop)
    }

    /// `give_back_unclaimed`, for a consumer that goes on: what came and could not be given
    /// back must not stay unacknowledged on a connection that goes on (the foreman would
    /// return it only when it leaves), so a failure closes the connection, which returns
    /// it, and wakes the loop, whose next claim connects again.
    fn give_back_or_close(&mut self) -> Result<usize> {
        self.give_back_unclaimed().inspect_err(|_| {
            self.drop_link();
            self.waker.wake_by_ref();
        })
    }

    /// What a claim's answer means for its tasks: those whose ack was confirmed run. A
    /// message whose ack could not be sent goes back to the queue by itself: its record
    /// goes, it is not run. One whose ack went out but whose round trip failed may or may
    /// not be off the queue: not run either, and recorded `lost`.
    fn settle_acks(&mut self, mut tasks: Vec<Claimed>, answer: Confirmed) -> Result<Vec<Claimed>> {
        let (mut sent, mut unsent) = (Vec::new(), Vec::new());
        for (task, ok) in tasks
            .iter()
            .zip(answer.sent.iter().chain(std::iter::repeat(&false)))
        {
            if *ok {
                sent.push(task.id);
            } else {
                unsent.push(task.id);
            }
        }
        let books = self.books()?;
        records::forget_running(books, &unsent)?;
        let mut dropped: HashSet<i64> = unsent.into_iter().collect();
        if let Err(e) = &answer.synced {
            records::set_state(
                books,
                &sent,
                "lost",
                "the connection to RabbitMQ failed while this task was acknowledged: not run \
                 (it may have been taken off the queue, or be handed out again)",
            )?;
            let now = now_micros();
            for task in tasks.iter().filter(|t| sent.contains(&t.id)) {
                self.outcomes.push(Outcome {
                    id: task.id,
                    task: task.task_name.clone(),
                    state: "lost".into(),
                    attempt: task.attempt,
                    started_at: None,
                    finished_at: now,
                    error: Some(
                        "the connection to RabbitMQ failed while it was acknowledged".into(),
                    ),
                    exit_code: None,
                    signal: None,
                });
            }
            dropped.extend(sent);
            tracing::debug!(queue = %self.name, "RabbitMQ: acks unconfirmed: {e}");
        }
        if !dropped.is_empty() {
            tracing::warn!(
                queue = %self.name,
                tasks = dropped.len(),
                "RabbitMQ: tasks not acknowledged on their connection are not run (the \
                 broker hands them out again, or they are recorded lost)"
            );
            self.drop_link();
            tasks.retain(|t| !dropped.contains(&t.id));
        }
        Ok(tasks)
    }
}

impl RabbitQueue {
    /// `snapq retry ID` with the queue here: the record of a task this machine's foreman
    /// ran (in `books`, the home's database) is published again under its id with its next
    /// attempt, due now, confirmed by the broker inside the transaction that marks the
    /// record `queued` (a publish that fails changes nothing). The foreman that runs it,
    /// on whichever machine, records how it ends.
    pub fn retry(&mut self, books: &Connection, id: i64) -> Result<records::Retried> {
        let name = self.name.clone();
        let note = format!(
            "published again to the RabbitMQ queue {name}: the machine whose foreman runs it \
             records how it ends"
        );
        let mut published = false;
        let retried = records::retry_into(books, id, Some(&note), |_, again| {
            let message = Message::of_row(
                again.id,
                &again.task_name,
                (&again.args, &again.kwargs),
                (again.due, again.due),
                again.attempt,
            );
            self.publish(&[(String::new(), name.clone(), message)])?;
            published = true;
            Ok(())
        });
        match retried {
            // Published, but the record's update did not commit: the task is queued all
            // the same, and must not be reported as not queued.
            Err(e) if published => {
                tracing::warn!(
                    "task {id} is queued again, but its record here was not updated: {e}"
                );
                self.published_attempt(books, id)
            }
            other => other,
        }
    }

    /// `show ID` of a task another machine's foreman ran: the last outcome published for
    /// it on `N.events` since shortly before it was enqueued (its id says when). None if no
    /// foreman published one: still queued or running, ended longer ago than the stream
    /// keeps, or ended by a foreman whose connection dropped before the outcome went out.
    pub fn recorded_elsewhere(&mut self, id: i64) -> Result<Option<Record>> {
        let events = format!("{}.events", self.name);
        let link = self.link()?;
        // Passive: a queue no foreman has consumed yet has no stream (and the failed check
        // closes this channel: the handle is not used after it).
        if link
            .broker
            .declare_queue(&events, true, Default::default())
            .is_err()
        {
            return Ok(None);
        }
        const BATCH: u16 = 500;
        let mut deliveries = link
            .broker
            .consume_with(
                &events,
                BATCH,
                args(&[("x-stream-offset", ArgValue::Timestamp(enqueued_about(id)))]),
            )
            .map_err(|e| Error::Runtime(format!("RabbitMQ: reading {events}: {e}")))?;
        let mut found: Option<Record> = None;
        let until = Instant::now() + CONFIRM_TIMEOUT;
        // The stream is read to its end: a task retried has several outcomes, the last
        // one counts. Its end is when nothing more comes for `STREAM_IDLE`.
        while Instant::now() < until {
            let got = deliveries.take_waiting(usize::from(BATCH), STREAM_IDLE);
            let Some(last) = got.last() else {
                break;
            };
            for incoming in &got {
                let Ok(batch) = serde_json::from_slice::<Outcomes>(&incoming.body) else {
                    continue;
                };
                let Outcomes {
                    host,
                    pid,
                    outcomes,
                } = batch;
                if let Some(o) = outcomes.into_iter().rev().find(|o| o.id == id) {
                    found = Some(record_of_outcome(o, host, pid));
                }
            }
            // A stream hands out more only as what it handed out is acknowledged.
            let answer = link.broker.ack_and_confirm(
                Acks::UpTo {
                    tag: last.delivery_tag,
                    count: got.len(),
                },
                BATCH,
            );
            answer
                .synced
                .map_err(|e| Error::Runtime(format!("RabbitMQ: reading {events}: {e}")))?;
        }
        Ok(found)
    }

    /// The attempt a task was published with when its record could not say so.
    fn published_attempt(&self, books: &Connection, id: i64) -> Result<records::Retried> {
        let attempt: i64 = books
            .query_row(
                "SELECT attempt FROM task_records WHERE id = ?1",
                [id],
                |r| r.get(0),
            )
            .unwrap_or(0);
        Ok(records::Retried::Queued {
            attempt: attempt + 1,
        })
    }
}

impl Drop for RabbitQueue {
    fn drop(&mut self) {
        self.tell(true);
        self.drop_link();
    }
}

/// The records' connection of a consumer; an enqueuer's handle has none. (A function of
/// the field, not of `self`, so that `self.finished` can be borrowed beside it.)
fn books_of(books: &Option<Connection>) -> Result<&Connection> {
    books.as_ref().ok_or_else(|| {
        Error::Runtime("this RabbitMQ queue handle keeps no records (an enqueuer's)".into())
    })
}

/// The routing key that spells `seconds` in binary, `LEVELS` bits, most significant first.
fn delay_key(seconds: u64) -> String {
    (0..LEVELS)
        .rev()
        .map(|bit| if seconds >> bit & 1 == 1 { "1" } else { "0" })
        .collect::<Vec<_>>()
        .join(".")
}

/// The binding pattern for "bit `bit` of the key is `value`".
fn bit_pattern(bit: u32, value: &str) -> String {
    let before = (LEVELS - 1 - bit) as usize;
    format!("{}{value}.#", "*.".repeat(before))
}

/// Declares the delay ladder of queue `name` (see the module's comment).
fn declare_ladder(broker: &Broker, name: &str) -> std::result::Result<(), String> {
    for bit in 0..LEVELS {
        let rung = format!("{name}.delay.{bit}");
        broker.declare_topic_exchange(&rung)?;
        let ttl = (1i64 << bit) * 1000;
        let below = if bit == 0 {
            String::new()
        } else {
            format!("{name}.delay.{}", bit - 1)
        };
        let mut queue_args = vec![
            ("x-message-ttl", ArgValue::Number(ttl)),
            ("x-dead-letter-exchange", ArgValue::Text(&below)),
        ];
        if bit == 0 {
            queue_args.push(("x-dead-letter-routing-key", ArgValue::Text(name)));
        }
        broker.declare_queue(&rung, false, args(&queue_args))?;
        broker.bind_queue(&rung, &rung, &bit_pattern(bit, "1"))?;
    }
    for bit in 0..LEVELS {
        let rung = format!("{name}.delay.{bit}");
        if bit == 0 {
            broker.bind_queue(name, &rung, &bit_pattern(0, "0"))?;
        } else {
            broker.bind_exchange(
                &format!("{name}.delay.{}", bit - 1),
                &rung,
                &bit_pattern(bit, "0"),
            )?;
        }
    }
    Ok(())
}

/// The events exchange `N.events` (topic; the outcomes' routing key is `outcomes`) and the
/// stream queue of the same name bound to all of it, which keeps what it gets for
/// `EVENTS_KEPT`. An operator may bind queues of their own to the exchange too.
fn declare_events(broker: &Broker, name: &str) -> std::result::Result<(), String> {
    let events = format!("{name}.events");
    broker.declare_topic_exchange(&events)?;
    broker.declare_queue(
        &events,
        false,
        args(&[
            ("x-queue-type", ArgValue::Text("stream")),
            ("x-max-age", ArgValue::Text(EVENTS_KEPT)),
        ]),
    )?;
    broker.bind_queue(&events, &events, "#")
}

/// Unix seconds of when task `id` was enqueued (`new_ids`), a minute early for clocks that
/// differ between machines.
fn enqueued_about(id: i64) -> u64 {
    let ms = (id >> 12).saturating_add(EPOCH_2026_MS);
    u64::try_from(ms / 1000 - 60).unwrap_or(0)
}

/// The record `show` gives of an outcome read from `N.events`.
fn record_of_outcome(o: Outcome, host: String, pid: u32) -> Record {
    Record {
        id: o.id,
        task: o.task,
        args: Value::Null,
        kwargs: Value::Null,
        state: o.state,
        attempt: o.attempt,
        enqueued_at: None,
        due_at: None,
        started_at: o.started_at.map(crate::clock::format_micros),
        finished_at: Some(crate::clock::format_micros(o.finished_at)),
        duration_seconds: o
            .started_at
            .map(|s| (o.finished_at - s).max(0) as f64 / 1e6),
        error: o.error,
        exit_code: o.exit_code.map(i64::from),
        signal: o.signal,
        output: None,
        output_truncated: false,
        foreman_pid: Some(i64::from(pid)),
        recorded_on: Some(host),
    }
}

/// Deletes queue `name`, its dead queue and its ladder (tests clean up with it).
pub fn delete_topology(url: &str, name: &str) -> std::result::Result<(), String> {
    let broker = Broker::connect(url)?;
    broker.delete(Some(name), None)?;
    broker.delete(Some(&format!("{name}.dead")), None)?;
    let events = format!("{name}.events");
    broker.delete(Some(&events), Some(&events))?;
    for bit in 0..LEVELS {
        let rung = format!("{name}.delay.{bit}");
        broker.delete(Some(&rung), Some(&rung))?;
    }
    broker.close();
    Ok(())
}

/// 2026-01-01 in Unix milliseconds: where task ids on RabbitMQ count from (`new_ids`).
const EPOCH_2026_MS: i64 = 1_767_225_600_000;

/// Task ids on RabbitMQ, where no table hands them out: the milliseconds since 2026 in the
/// high bits and 12 low bits, from a random start for each batch, one a task. They grow
/// with time (`history` lists newest first by id) and stay below 2^53 (exact as JSON
/// numbers in a browser) until 2095. Two enqueuers in the same millisecond may draw
/// overlapping ranges: unlikely (a batch of n collides with another with chance about n in
/// 4,096), not impossible.
fn new_ids(count: usize) -> Vec<i64> {
    let ms = (now_micros() / 1000 - EPOCH_2026_MS).max(0);
    let base = (ms << 12) + fastrand::i64(0..4096);
    (0..count as i64).map(|i| base + i).collect()
}

impl QueueBackend for RabbitQueue {
    fn name(&self) -> &'static str {
        "rabbitmq"
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            cancel_by_id: false,
            exact_counts: false,
            delay_resolution: Duration::from_secs(1),
            priorities: false,
            due_order: false,
            shows_queued: false,
            claims_wait_for_round_trip: true,
        }
    }

    fn enqueue(&mut self, tasks: &[NewTask]) -> Result<Vec<i64>> {
        let now = now_micros();
        let ids = new_ids(tasks.len());
        let mut messages = Vec::with_capacity(tasks.len());
        for (task, &id) in tasks.iter().zip(&ids) {
            let due = match task.when {
                When::Now => now,
                When::After(d) => now.saturating_add(crate::clock::micros_of(d)),
                When::At(at) => at,
            };
            let (exchange, key) = self.route(due, now)?;
            messages.push((
                exchange,
                key,
                Message {
                    id,
                    task: task.task.clone(),
                    args: task.args.clone(),
                    kwargs: task.kwargs.clone(),
                    enqueued_at: now,
                    due_at: due,
                    attempt: 1,
                    error: None,
                },
            ));
        }
        self.publish(&messages)?;
        Ok(ids)
    }

    fn claim(
        &mut self,
        limit: usize,
        policy: &dyn Fn(&str) -> Option<RetryPolicy>,
    ) -> Result<Vec<Lease>> {
        self.settle_leases()?;
        self.adapt_prefetch()?;
        let mut deliveries = self.deliveries(limit)?;
        // An at-least-once task handed out again is a suspect: its last holder died or lost
        // its connection, perhaps because of it (a task that kills its foreman). RabbitMQ
        // 3.10 counts every delivery a dying consumer held toward the delivery limit, so
        // while a suspect runs this foreman holds nothing else: the other deliveries go
        // back to the queue as new messages and the consumer stops until it ends (`settle`).
        // Should it kill this foreman too, only it comes back counted: the next foreman of
        // this machine finds the attempt that died in its record (and after the last one
        // moves it to the dead queue itself, `bury`); on other machines, after
        // `DELIVERY_LIMIT` deaths the broker moves it there, alone.
        let suspect = deliveries.iter().enumerate().find_map(|(at, incoming)| {
            if !incoming.redelivered {
                return None;
            }
            let message = serde_json::from_slice::<Message>(&incoming.body).ok()?;
            policy(&message.task).is_some().then_some((at, message))
        });
        let mut isolating = None;
        if let Some((at, message)) = suspect {
            let alone = deliveries.remove(at);
            let max = policy(&message.task).map_or(1, |p| p.max_attempts());
            let id = message.id;
            match self.isolate(&deliveries, alone, message, max) {
                Ok(Some((alone, next))) => {
                    isolating = Some((id, next));
                    deliveries = vec![alone];
                }
                Ok(None) => return Ok(Vec::new()),
                Err(e) => {
                    // Closing the connection returns what is still unacknowledged (counted
                    // once more) rather than leave it on a connection that goes on.
                    self.drop_link();
                    self.waker.wake_by_ref();
                    return Err(e);
                }
            }
        }
        let generation = self.generation;
        let mut claimed = Vec::with_capacity(deliveries.len());
        let mut at_most_once = Vec::new();
        let mut leased = Vec::new();
        for incoming in deliveries {
            let (task, message) = match serde_json::from_slice::<Message>(&incoming.body) {
                Ok(m) => {
                    // Handed out again: the consumer before died or lost its connection
                    // while it ran (or before it started): its next attempt.
                    let attempt = match isolating {
                        Some((id, Some(next))) if id == m.id => next,
                        _ => m.attempt + i64::from(incoming.redelivered),
                    };
                    (
                        Claimed {
                            id: m.id,
                            task_name: m.task.clone(),
                            args: m.args.to_string(),
                            kwargs: m.kwargs.to_string(),
                            created_at: m.enqueued_at,
                            due: m.due_at,
                            attempt,
                            unreadable: None,
                        },
                        Some(Message { attempt, ..m }),
                    )
                }
                Err(e) => (
                    Claimed {
                        id: new_ids(1)[0],
                        task_name: String::from_utf8_lossy(&incoming.body)
                            .chars()
                            .take(60)
                            .collect(),
                        args: "[]".into(),
                        kwargs: "{}".into(),
                        created_at: now_micros(),
                        due: now_micros(),
                        attempt: 1,
                        unreadable: Some(format!(
                            "the message is not a snapq task ({e}); enqueuers publish \
                             {{\"id\", \"task\", \"args\", \"kwargs\", \"enqueued_at\", \
                             \"due_at\", \"attempt\"}} as JSON"
                        )),
                    },
                    None,
                ),
            };
            match (
                message,
                task.unreadable
                    .is_none()
                    .then(|| policy(&task.task_name))
                    .flatten(),
            ) {
                (Some(message), Some(_)) => leased.push((task.id, incoming, message)),
                _ => at_most_once.push((task.id, incoming)),
            }
            claimed.push(task);
        }
        // The records first: a foreman that dies after this and before the acks leaves
        // `running` records of tasks the broker hands out again (then `lost` here, run
        // elsewhere), never a task gone without a record.
        let ends = self.outcomes_of(&self.finished);
        let books = books_of(&self.books)?;
        let mut claimed = records::claim(
            books,
            &mut self.finished,
            &self.claimer,
            |name| policy(name).map(|p| p.max_attempts()),
            |_| Ok(claimed),
        )?;
        self.written(ends);
        if !at_most_once.is_empty() {
            // Acked on the connection that brought them, and confirmed by a round trip
            // on it: only then may they run (at most once). The claim waits for the
            // answer: letting claims overlap, each with fewer tasks, was slower (more
            // round trips for the broker to answer; BENCHMARKS.md).
            let ids: HashSet<i64> = at_most_once.iter().map(|(id, _)| *id).collect();
            let tasks: Vec<Claimed> = claimed.extract_if(.., |t| ids.contains(&t.id)).collect();
            let prefetch = self.prefetch.unwrap_or(1);
            let answer = match self.link.as_ref().filter(|l| l.generation == generation) {
                Some(link) => {
                    let messages: Vec<&Incoming> = at_most_once.iter().map(|(_, m)| m).collect();
                    // Deliveries come in tag order and claims take the oldest, so one ack
                    // of every tag up to the batch's highest acknowledges exactly this
                    // batch, unless a lease held unacknowledged has a lower tag. One frame
                    // sent with the confirming method, instead of a wait per message:
                    // 5,100 → 8,200–9,200 noops a second (BENCHMARKS.md).
                    let top = messages.iter().map(|m| m.delivery_tag).max().unwrap_or(0);
                    let leases_below = leased.iter().any(|(_, i, _)| i.delivery_tag <= top)
                        || self
                            .held
                            .values()
                            .any(|h| h.generation == generation && h.incoming.delivery_tag <= top);
                    let acks = if leases_below {
                        Acks::Each(&messages)
                    } else {
                        Acks::UpTo {
                            tag: top,
                            count: messages.len(),
                        }
                    };
                    link.broker.ack_and_confirm(acks, prefetch)
                }
                None => Confirmed {
                    sent: vec![false; tasks.len()],
                    synced: Err("the connection that brought them is gone".into()),
                },
            };
            claimed.extend(self.settle_acks(tasks, answer)?);
        }
        for (id, incoming, message) in leased {
            self.held.insert(
                id,
                Held {
                    incoming,
                    message,
                    generation,
                },
            );
        }
        let now = now_micros();
        for task in &claimed {
            self.started
                .insert(task.id, (task.task_name.clone(), task.attempt, now));
        }
        self.suspect = isolating
            .map(|(id, _)| id)
            .filter(|id| claimed.iter().any(|t| t.id == *id));
        self.tell(false);
        Ok(claimed
            .into_iter()
            .map(|task| Lease {
                retry: self
                    .held
                    .contains_key(&task.id)
                    .then(|| policy(&task.task_name))
                    .flatten(),
                task,
            })
            .collect())
    }

    fn settle(&mut self, end: Finish) {
        if self.suspect == Some(end.id) {
            // It ended without taking the foreman along: consume again.
            self.suspect = None;
            self.waker.wake_by_ref();
        }
        if let Some((_, _, started)) = self.started.get(&end.id) {
            let took = Duration::from_micros(u64::try_from(end.at - started).unwrap_or(0));
            self.typical_task = Some(self.typical_task.map_or(took, |t| (t * 3 + took) / 4));
        }
        self.finished.push(end);
    }

    /// Ends not written yet, and outcomes not published yet (`flush` does both).
    fn unsettled(&self) -> usize {
        self.finished.len() + self.outcomes.len()
    }

    fn flush(&mut self) -> Result<Option<i64>> {
        let requeued = self.settle_leases()?;
        let ends = self.outcomes_of(&self.finished);
        let books = books_of(&self.books)?;
        records::settle(books, &mut self.finished)?;
        self.written(ends);
        self.tell(true);
        // The retry waits in the broker's ladder and comes as a delivery; the time only
        // tells the foreman when to look.
        Ok(requeued)
    }

    fn release(&mut self, leases: Vec<Lease>) -> Result<()> {
        // Each goes back as it was: published again (confirmed), then its delivery, if
        // unacknowledged, acked. A nack would mark it redelivered, which counts an attempt.
        let mut messages = Vec::new();
        let mut held = Vec::new();
        for Lease { task, .. } in &leases {
            let message = match self.held.remove(&task.id) {
                Some(h) => {
                    let m = h.message.clone();
                    held.push(h);
                    m
                }
                None => Message::of_row(
                    task.id,
                    &task.task_name,
                    (&task.args, &task.kwargs),
                    (task.created_at, task.due),
                    task.attempt,
                ),
            };
            messages.push((String::new(), self.name.clone(), message));
        }
        self.publish(&messages)?;
        let generation = self.generation;
        if let Ok(link) = self.link() {
            for h in &held {
                if h.generation == generation {
                    let _ = link.broker.ack(&h.incoming);
                }
            }
        }
        let ids: Vec<i64> = leases.iter().map(|l| l.task.id).collect();
        records::set_state(self.books()?, &ids, "queued", "")?;
        Ok(())
    }

    /// Cancels the consumer (the broker sends nothing after it answers), then publishes
    /// what came and was not claimed back to the queue and acks it: given back with a nack,
    /// it would come again marked redelivered, which counts an attempt.
    fn stop_taking(&mut self) -> Result<()> {
        self.give_back_unclaimed().map(drop)
    }

    fn wake_ups(&self) -> Receiver<()> {
        self.wake_rx.clone()
    }

    fn wake_ups_need_check(&self) -> bool {
        false
    }

    fn check_wake_ups(&mut self) -> Result<bool> {
        Ok(false)
    }

    fn next_due(&mut self) -> Result<Option<i64>> {
        // Delays wait in the broker: a delivery wakes the foreman when one is due.
        Ok(None)
    }

    /// Nothing in hand, nothing ready in the queue, and nothing on its way to this consumer
    /// (delayed tasks wait in the ladder and do not count: `--burst` runs what is due).
    fn drained(&mut self) -> Result<bool> {
        let name = self.name.clone();
        let waker = self.waker.clone();
        let link = self.link()?;
        // The count is a round trip on the consumer's channel: deliveries the channel sent
        // before its answer are in the consumer's buffer by then (one channel keeps its
        // order, and lapin's I/O loop handles the frames in order).
        let ready = link
            .broker
            .declare_queue(&name, true, Default::default())
            .map_err(|e| Error::Runtime(format!("RabbitMQ: {e}")))?;
        let in_hand = link
            .deliveries
            .as_mut()
            .is_some_and(|d| d.any(&mut Context::from_waker(&waker)));
        if ready > 0 || in_hand {
            return Ok(false);
        }
        // The queue counts what it has handed this consumer as taken even while it is on
        // its way: the queue and the channel are separate processes in the broker, so the
        // round trip above does not wait for it. A foreman that left now would return it
        // on closing, after the other foremen of a `--burst` had found the queue empty and
        // left too (3 foremen left 4 to 32 of 20,000 tasks queued about one run in 15).
        // The cancel's answer comes after the last of it; whatever came goes back to the
        // queue, for this foreman's next claim (which consumes again: the wake-up) or
        // another's (the conformance suite's `drained_only_once_every_due_task_was_claimed`).
        if self.give_back_or_close()? > 0 {
            self.waker.wake_by_ref();
            return Ok(false);
        }
        Ok(true)
    }

    fn counts(&mut self, _now: i64) -> Result<Counts> {
        let name = self.name.clone();
        let consumer = self.prefetch.is_some();
        let link = self.link()?;
        let due = link
            .broker
            .declare_queue(&name, true, Default::default())
            .map_err(|e| Error::Runtime(format!("RabbitMQ: {e}")))?;
        // The ladder's rungs. A consumer declares the ladder (its connection may hold
        // leases, which a closed channel would hand out again); `status` asks without
        // declaring it (a count changes nothing on the broker): a ladder nobody has
        // published through yet is missing, and the first missing rung closes the
        // channel, so that connection, which holds nothing, goes.
        if consumer && !link.ladder_declared {
            declare_ladder(&link.broker, &name).map_err(Error::Runtime)?;
            link.ladder_declared = true;
        }
        let mut delayed = 0;
        let mut missing = false;
        for bit in 0..LEVELS {
            match link.broker.declare_queue(
                &format!("{name}.delay.{bit}"),
                true,
                Default::default(),
            ) {
                Ok(n) => delayed += n,
                Err(_) => {
                    missing = true;
                    break;
                }
            }
        }
        if missing {
            self.drop_link();
        }
        Ok(Counts {
            due: i64::from(due),
            delayed: i64::from(delayed),
            oldest_due: None,
            next_delayed: None,
        })
    }

    fn rescue(&mut self, alive: &[u32]) -> Result<Vec<Orphan>> {
        records::mark_lost_of_broker(self.books()?, alive)
    }

    fn show(&mut self, id: i64) -> Result<Option<Record>> {
        records::show(self.books()?, id)
    }

    fn cancel(&mut self, _id: i64) -> Result<Cancelled> {
        Err(unsupported(
            "rabbitmq",
            "take a task off the queue by its id (a broker hands out messages, it does not \
             look them up)",
            "let it run, or stop its task type from doing anything",
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delay_keys_and_patterns_spell_the_bits() {
        let key = delay_key(5);
        assert_eq!(key.split('.').count(), LEVELS as usize);
        assert!(key.ends_with("1.0.1"), "{key}");
        assert_eq!(
            bit_pattern(0, "1"),
            format!("{}1.#", "*.".repeat(LEVELS as usize - 1))
        );
        assert_eq!(bit_pattern(LEVELS - 1, "0"), "0.#");
    }

    #[test]
    fn ids_grow_and_stay_exact_in_json() {
        let a = new_ids(3);
        std::thread::sleep(Duration::from_millis(2));
        let b = new_ids(1);
        assert_eq!(a[1], a[0] + 1);
        assert!(b[0] > a[0], "{a:?} {b:?}");
        assert!(b[0] < 1 << 53);
    }

    /// `show` reads the events stream from a minute before the id was made.
    #[test]
    fn an_id_says_when_it_was_made() {
        let now = u64::try_from(now_micros() / 1_000_000).unwrap();
        let about = enqueued_about(new_ids(1)[0]);
        assert!(
            (now - 61..=now - 59).contains(&about),
            "{about} against {now}"
        );
    }
}
