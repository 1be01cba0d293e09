//! The queue interface: what the foreman needs of a task queue, whatever holds it.
//!
//! A backend stores tasks durably, hands the foreman due ones as *leases*, takes their
//! ends back (`settle`), and tells the foreman when new work may have come (`wake_ups`).
//! It also keeps each task's record (src/records.rs): the claim writes it `running`, the
//! end its final state, so "what happened to task 42?" has one answer per backend.
//!
//! Two delivery modes, chosen per task type by its retry policy (`registry::RetryPolicy`):
//!
//! - **at most once** (no policy): the lease *is* the removal from the queue, committed
//!   before the task runs. A foreman that dies loses its running tasks (recorded `lost`),
//!   and nothing ever runs twice.
//! - **at least once** (a policy): the lease is held in the backend, under the foreman's
//!   name, until the task's end is settled; a failure or the foreman's death puts it back
//!   with its next attempt until the attempts run out (`dead`).
//!
//! Backends differ in what they can do: `Capabilities` says, and an operation a backend
//! cannot do fails with an error naming it (`unsupported`). `conformance` is the one suite
//! every backend passes. ARCHITECTURE.md, "Adding a queue backend", lists the steps.

pub mod conformance;
pub mod rabbitmq;
pub mod sqlite;

use std::time::Duration;

use crossbeam_channel::Receiver;

use crate::error::{Error, Result};
use crate::queue::{Claimed, Counts, NewTask};
use crate::records::{Cancelled, Finish, Orphan, Record};
use crate::registry::RetryPolicy;

pub use rabbitmq::RabbitQueue;
pub use sqlite::SqliteQueue;

/// What a backend can do. An operation it cannot do fails with `unsupported`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Capabilities {
    /// `cancel` takes a queued task off the queue by its id.
    pub cancel_by_id: bool,
    /// `counts` are exact; otherwise they are "at least" (a broker sees only its side).
    pub exact_counts: bool,
    /// The finest step of a delay it keeps (SQLite: a microsecond).
    pub delay_resolution: Duration,
    /// Whether tasks can jump the queue by priority.
    pub priorities: bool,
    /// Whether `show` finds a task that waits in the queue and never ran here (a broker
    /// does not look messages up; a foreman's records know only what it claimed).
    pub shows_queued: bool,
    /// Whether claims come in due order (then id). A broker's consumers take what it
    /// hands out, about first in, first out.
    pub due_order: bool,
    /// Whether each claim waits for an answer over the network (a broker's round trip).
    pub claims_wait_for_round_trip: bool,
}

/// A claimed task: the foreman runs it, then settles it (`QueueBackend::settle`) or, if
/// it never started, releases it (`QueueBackend::release`).
#[derive(Debug)]
pub struct Lease {
    pub task: Claimed,
    /// The policy it was claimed under: `Some` makes it an at-least-once lease.
    pub retry: Option<RetryPolicy>,
}

/// The queue seen by the foreman (and by enqueuers, through `enqueue`).
///
/// Only the foreman loop calls a backend's consuming side, from one thread (invariant 8):
/// the trait asks for `&mut self` and nothing of `Sync`.
pub trait QueueBackend {
    /// The backend's name for messages: `sqlite`, `rabbitmq`.
    fn name(&self) -> &'static str;

    fn capabilities(&self) -> Capabilities;

    /// The foreman has started: from now on a write waits only briefly for anything
    /// another process holds, and fails to be tried again on the loop's schedule
    /// (invariant 11).
    fn started(&mut self) -> Result<()> {
        Ok(())
    }

    /// Stores checked tasks durably before it returns (one transaction, or one confirmed
    /// batch) and wakes the consumers; returns their ids in order.
    fn enqueue(&mut self, tasks: &[NewTask]) -> Result<Vec<i64>>;

    /// Claims up to `limit` due tasks, oldest due first, writing each one's record
    /// `running`. `policy` gives a task type's retry policy: with one the task is leased
    /// (at least once), without it removed (at most once). Ends settled before the claim
    /// are written with it.
    fn claim(
        &mut self,
        limit: usize,
        policy: &dyn Fn(&str) -> Option<RetryPolicy>,
    ) -> Result<Vec<Lease>>;

    /// Takes a task's end. A backend may keep ends and write them with its next claim (the
    /// SQLite one does: one transaction for both); `flush` writes them now.
    fn settle(&mut self, end: Finish);

    /// How many ends `settle` kept and did not write yet.
    fn unsettled(&self) -> usize;

    /// Writes the ends `settle` kept. Returns when the earliest task it put back for a
    /// retry is due, if it put one back. Ends that could not be written are kept for the
    /// next call.
    fn flush(&mut self) -> Result<Option<i64>>;

    /// Puts leases whose tasks never started back in the queue as they were (same attempt,
    /// no record of a run).
    fn release(&mut self, leases: Vec<Lease>) -> Result<()>;

    /// The foreman is stopping (invariant 2): take nothing more, and hand back what came
    /// in and was not claimed, as it was. (The SQLite queue hands out nothing unclaimed.)
    fn stop_taking(&mut self) -> Result<()> {
        Ok(())
    }

    /// Tokens meaning "new work may be there": a channel the foreman waits on beside its
    /// signals and completions. A broker's delivery is its own wake-up.
    fn wake_ups(&self) -> Receiver<()>;

    /// Whether the source of wake-ups may have failed since the last check (the SQLite
    /// backend's watched directory was removed); then the foreman calls `check_wake_ups`.
    fn wake_ups_need_check(&self) -> bool;

    /// Repairs the source of wake-ups if it failed; true if it was repaired (wake-ups may
    /// have been missed meanwhile: the foreman reads the queue again).
    fn check_wake_ups(&mut self) -> Result<bool>;

    /// When the earliest task not yet due becomes due, if the backend knows (Unix µs).
    fn next_due(&mut self) -> Result<Option<i64>>;

    /// Asks the next claims to look for rows written with a due time that is not a
    /// number (a writer's mistake; SQLite only): the foreman asks at start and at each
    /// safety re-read.
    fn sweep(&mut self) {}

    /// Whether nothing due waits for this consumer, after a claim came back short (`run
    /// --burst` ends then): nothing ready, and nothing on its way to it that a broker
    /// already handed it. A short claim of the SQLite queue says so by itself.
    fn drained(&mut self) -> Result<bool> {
        Ok(true)
    }

    /// Queue figures for `status` and the live view (`Capabilities::exact_counts` says
    /// whether they are exact).
    fn counts(&mut self, now: i64) -> Result<Counts>;

    /// Settles the records of tasks that were running under foremen no longer among
    /// `alive` (this one included): at most once, `lost`; leases, back in the queue with
    /// their next attempt, or `dead` if it was their last.
    fn rescue(&mut self, alive: &[u32]) -> Result<Vec<Orphan>>;

    /// Task `id` wherever it is: queued, running or ended.
    fn show(&mut self, id: i64) -> Result<Option<Record>>;

    /// Takes a queued task off the queue, recorded `cancelled`.
    fn cancel(&mut self, id: i64) -> Result<Cancelled>;
}

/// Where the task queue is (`--queue`, `--queue-name`).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum QueueTarget {
    /// The home's database (`--db`), or the one `sqlite:PATH` names.
    #[default]
    Sqlite,
    /// A RabbitMQ queue: foremen on several machines consume it.
    RabbitMq { url: String, name: String },
}

impl QueueTarget {
    /// Reads `--queue URL` and `--queue-name NAME`: `sqlite:PATH` (returned as the
    /// database path), `amqp://…` or `amqps://…`; anything else is bad input.
    pub fn parse(
        url: Option<&str>,
        name: &str,
    ) -> Result<(QueueTarget, Option<std::path::PathBuf>)> {
        let Some(url) = url else {
            return Ok((QueueTarget::Sqlite, None));
        };
        if let Some(path) = url.strip_prefix("sqlite:") {
            if path.is_empty() {
                return Err(Error::bad_input(
                    "--queue",
                    "sqlite: needs a path, e.g. sqlite:/var/lib/snapq/snapq.sqlite3",
                ));
            }
            return Ok((QueueTarget::Sqlite, Some(path.into())));
        }
        if url.starts_with("amqp://") || url.starts_with("amqps://") {
            if !crate::config::is_plain_name(name) {
                return Err(Error::bad_input(
                    "--queue-name",
                    format!(
                        "{name:?}: give 1 to 200 letters, digits, '_', '-' and '.' (the queue's \
                         name on the broker)"
                    ),
                ));
            }
            return Ok((
                QueueTarget::RabbitMq {
                    url: url.to_owned(),
                    name: name.to_owned(),
                },
                None,
            ));
        }
        Err(Error::bad_input(
            "--queue",
            format!(
                "{:?} is not a queue URL; give sqlite:PATH (a database) or \
                 amqp://USER:PASSWORD@HOST:PORT/VHOST (RabbitMQ)",
                crate::rabbitmq::redact(url)
            ),
        ))
    }
}

/// The error for an operation `backend` cannot do.
pub fn unsupported(backend: &str, what: &str, instead: &str) -> Error {
    Error::Unsupported(format!("the {backend} queue cannot {what}; {instead}"))
}
