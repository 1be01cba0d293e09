//! Task records (`task_records`, migrations/0006): what happened to every task.
//!
//! The foreman's claim transaction deletes the queue rows and writes their records, state
//! `running`, together (`claim`): a task is never gone from the queue without a record,
//! and at-most-once stays exactly as before (invariant 1). The final states of finished
//! tasks wait in the foreman's memory and are written in its next claim transaction, or
//! by `settle` when no claim comes soon: never a transaction per finished task
//! (invariant 9). A record still `running` when its foreman is gone is `lost`: found when
//! a foreman starts (`mark_lost`).
//!
//! `show`, `history` and `cancel` are the readers' side, for the CLI and for programs:
//!
//! ```no_run
//! use snapq::db::{self, Synchronous};
//! use snapq::records::{self, Filter};
//!
//! let conn = db::open("/var/lib/snapq/snapq.sqlite3".as_ref(), Synchronous::Full)?;
//! if let Some(task) = records::show(&conn, 42)? {
//!     println!("task 42 is {}", task.state);
//! }
//! let failed = Filter {
//!     states: vec!["failed".into()],
//!     limit: 10,
//!     ..Filter::default()
//! };
//! for task in records::history(&conn, &failed)? {
//!     println!("{} {}: {:?}", task.id, task.task, task.error);
//! }
//! # Ok::<(), snapq::Error>(())
//! ```

use rusqlite::{Connection, OptionalExtension, params};
use serde::Serialize;

use crate::clock::{format_micros, now_micros};
use crate::db;
use crate::error::{Error, Result};
use crate::pool::CommandEnd;
use crate::queue::Claimed;
use crate::registry::RetryPolicy;

/// Every state a task can be in, as `show` and `history` name them.
pub const STATES: [&str; 11] = [
    "queued",
    "running",
    "succeeded",
    "failed",
    "panicked",
    "rejected",
    "timed_out",
    "abandoned",
    "lost",
    "cancelled",
    "dead",
];

/// A task's end, waiting to be written.
#[derive(Debug, Clone, PartialEq)]
pub struct Finish {
    pub id: i64,
    /// `succeeded`, `failed`, `panicked`, `rejected`, `timed_out` or `abandoned`.
    pub state: &'static str,
    pub error: Option<String>,
    /// Unix µs.
    pub at: i64,
    /// A command task's exit code, signal and output.
    pub command: Option<Box<CommandEnd>>,
    /// The policy of a task claimed as a lease (at least once): a failure puts it back in
    /// the queue rather than ending it, until its attempts run out.
    pub retry: Option<RetryPolicy>,
}

/// Who claims: written into each record.
#[derive(Debug, Clone)]
pub struct Claimer {
    pub pid: u32,
    pub host: String,
}

impl Claimer {
    pub fn this_process() -> Claimer {
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_owned())
            .unwrap_or_default();
        Claimer {
            pid: std::process::id(),
            host,
        }
    }
}

/// In one transaction: writes the final states in `finished` (emptying it), runs `claim`
/// (which deletes queue rows and returns them) and writes a `running` record for each
/// claimed task. On an error nothing is written and `finished` is kept for next time.
///
/// `leased` gives a task type's number of attempts if it is run at least once: its record
/// then holds them (`max_attempts`), which makes the record a lease (invariant 10).
pub fn claim(
    conn: &Connection,
    finished: &mut Vec<Finish>,
    claimer: &Claimer,
    leased: impl Fn(&str) -> Option<i64>,
    claim: impl FnOnce(&Connection) -> Result<Vec<Claimed>>,
) -> Result<Vec<Claimed>> {
    let claimed = db::immediate(conn, "the claim", || {
        write_finished(conn, finished)?;
        let claimed = claim(conn)?;
        let now = now_micros();
        let mut insert = conn
            .prepare_cached(
                "INSERT OR REPLACE INTO task_records (id, task_name, args, kwargs, enqueued_at, \
                 due_at, started_at, state, foreman_pid, host, attempt, max_attempts) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, 'running', ?8, ?9, ?10, ?11)",
            )
            .map_err(Error::sqlite("preparing the record insert"))?;
        for task in &claimed {
            insert
                .execute(params![
                    task.id,
                    task.task_name,
                    task.args,
                    task.kwargs,
                    task.created_at,
                    task.due,
                    now,
                    claimer.pid,
                    claimer.host,
                    task.attempt,
                    leased(&task.task_name)
                ])
                .map_err(Error::sqlite("recording a claimed task"))?;
        }
        Ok(claimed)
    })?;
    finished.clear();
    Ok(claimed)
}

/// Writes the final states in `finished` in a transaction of their own, emptying it.
/// Returns when the earliest task it put back for a retry is due (the caller's next due
/// time may need to move up to it).
pub fn settle(conn: &Connection, finished: &mut Vec<Finish>) -> Result<Option<i64>> {
    if finished.is_empty() {
        return Ok(None);
    }
    let requeued = db::immediate(conn, "recording finished tasks", || {
        write_finished(conn, finished)
    })?;
    finished.clear();
    Ok(requeued)
}

/// Writes each end; a leased task's failure puts it back instead (`settle_lease`). Returns
/// the earliest due time of the tasks put back.
fn write_finished(conn: &Connection, finished: &[Finish]) -> Result<Option<i64>> {
    let mut requeued: Option<i64> = None;
    let mut update = conn
        .prepare_cached(
            "UPDATE task_records SET state = ?2, error = ?3, finished_at = ?4, \
             started_at = CASE WHEN ?2 = 'rejected' THEN NULL ELSE started_at END, \
             exit_code = ?5, signal = ?6, output = ?7, output_truncated = ?8 \
             WHERE id = ?1 AND state = 'running'",
        )
        .map_err(Error::sqlite("preparing the record update"))?;
    for f in finished {
        if let Some(policy) = &f.retry
            && matches!(f.state, "failed" | "panicked" | "timed_out" | "abandoned")
        {
            if let Some(due) = settle_lease(conn, f, policy)? {
                requeued = Some(requeued.map_or(due, |r| r.min(due)));
            }
            continue;
        }
        let (exit_code, signal, output, truncated) = command_columns(f.command.as_deref());
        update
            .execute(params![
                f.id, f.state, f.error, f.at, exit_code, signal, output, truncated
            ])
            .map_err(Error::sqlite("recording a finished task"))?;
    }
    Ok(requeued)
}

/// A leased task that failed, timed out, panicked or was stopped at the graceful deadline:
/// back into the queue under its id with its next attempt (`lease_end`), or `dead` when its
/// last attempt failed. Returns the due time it was put back for. A lease that is not
/// `running` any more (another foreman found this one dead and rescued it) is left as it
/// is.
fn settle_lease(conn: &Connection, f: &Finish, policy: &RetryPolicy) -> Result<Option<i64>> {
    let lease: Option<(i64, i64)> = conn
        .prepare_cached(
            "SELECT attempt, coalesce(max_attempts, 1) FROM task_records \
             WHERE id = ?1 AND state = 'running'",
        )
        .and_then(|mut s| {
            s.query_row([f.id], |r| Ok((r.get(0)?, r.get(1)?)))
                .optional()
        })
        .map_err(Error::sqlite("reading a lease"))?;
    let Some((attempt, max_attempts)) = lease else {
        return Ok(None);
    };
    match lease_end(f, policy, attempt, max_attempts) {
        LeaseEnd::Dead { why } => {
            record_dead(conn, f, &why)?;
            Ok(None)
        }
        LeaseEnd::Again { due, why } => {
            back_in_queue(conn, f.id, due)?;
            record_waiting(conn, f.id, due, &why, f.command.as_deref())?;
            Ok(Some(due))
        }
    }
}

/// Puts the task of record `id` back in the database's queue under its id, with its
/// next attempt, due at `due` (Unix µs). OR IGNORE: an id never repeats in the queue, and
/// a row somehow there already must not fail the transaction that carries other tasks'
/// ends.
fn back_in_queue(conn: &Connection, id: i64, due: i64) -> Result<()> {
    conn.prepare_cached(
        "INSERT OR IGNORE INTO tasks (id, task_name, args, kwargs, created_at, run_at, \
         attempt) SELECT id, task_name, args, kwargs, enqueued_at, ?2, attempt + 1 \
         FROM task_records WHERE id = ?1",
    )
    .and_then(|mut s| s.execute(params![id, due]))
    .map_err(Error::sqlite("putting a task back in the queue"))?;
    Ok(())
}

/// What the end of a leased task's attempt means (invariant 10), whatever queue holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LeaseEnd {
    /// Its last attempt failed.
    Dead { why: String },
    /// Again, as attempt + 1, due at `due` (Unix µs).
    Again { due: i64, why: String },
}

/// Decides a leased task's end `f` (a failure, or `abandoned` at the graceful deadline)
/// on attempt `attempt` of `max_attempts`: after the backoff of `policy` it comes back,
/// unless that was its last attempt; stopped by the foreman, it comes back at once
/// whatever its attempts (that was not the task's failure).
pub fn lease_end(f: &Finish, policy: &RetryPolicy, attempt: i64, max_attempts: i64) -> LeaseEnd {
    let error = f.error.as_deref().unwrap_or("failed");
    let released = f.state == "abandoned";
    if !released && attempt >= max_attempts {
        return LeaseEnd::Dead {
            why: format!("{error} (attempt {attempt} of {max_attempts}: no retries left)"),
        };
    }
    let wait = if released {
        std::time::Duration::ZERO
    } else {
        policy.delay(attempt, fastrand::f64())
    };
    LeaseEnd::Again {
        due: f.at.saturating_add(crate::clock::micros_of(wait)),
        why: if released {
            format!("attempt {attempt} was stopped: {error}")
        } else {
            format!("attempt {attempt} of {max_attempts} {}: {error}", f.state)
        },
    }
}

/// A command's exit code, signal, output and whether it was cut, as their columns hold
/// them (all NULL for a task that is not a command).
type CommandColumns<'a> = (Option<i32>, Option<&'a str>, Option<&'a [u8]>, Option<bool>);

/// The `CommandColumns` of a task's end.
fn command_columns(c: Option<&CommandEnd>) -> CommandColumns<'_> {
    (
        c.and_then(|c| c.exit_code),
        c.and_then(|c| c.signal.as_deref()),
        c.map(|c| c.output.as_slice()),
        c.map(|c| c.truncated),
    )
}

/// Records task `f.id` `dead`: its last attempt's end, `why` as its error.
pub fn record_dead(conn: &Connection, f: &Finish, why: &str) -> Result<()> {
    let (exit_code, signal, output, truncated) = command_columns(f.command.as_deref());
    conn.prepare_cached(
        "UPDATE task_records SET state = 'dead', error = ?2, finished_at = ?3, \
         exit_code = ?4, signal = ?5, output = ?6, output_truncated = ?7 WHERE id = ?1",
    )
    .and_then(|mut s| {
        s.execute(params![
            f.id, why, f.at, exit_code, signal, output, truncated
        ])
    })
    .map_err(Error::sqlite("recording a dead task"))?;
    Ok(())
}

/// The attempt a foreman of this database died running, if task `id`'s record says one
/// did (`mark_lost_of_broker` left it `abandoned`, a lease that had started).
pub fn died_running(conn: &Connection, id: i64) -> Result<Option<i64>> {
    conn.prepare_cached(
        "SELECT attempt FROM task_records WHERE id = ?1 AND state = 'abandoned' \
         AND max_attempts IS NOT NULL AND started_at IS NOT NULL",
    )
    .and_then(|mut s| s.query_row([id], |r| r.get(0)).optional())
    .map_err(Error::sqlite("reading a task's record"))
}

/// Marks task `id`'s record `queued` for its next attempt, due at `due`, keeping the last
/// attempt's error (`why`) and output.
pub fn record_waiting(
    conn: &Connection,
    id: i64,
    due: i64,
    why: &str,
    command: Option<&CommandEnd>,
) -> Result<()> {
    let (exit_code, signal, output, truncated) = command_columns(command);
    conn.prepare_cached(
        "UPDATE task_records SET state = 'queued', attempt = attempt + 1, due_at = ?2, \
         started_at = NULL, finished_at = NULL, error = ?3, exit_code = ?4, signal = ?5, \
         output = ?6, output_truncated = ?7 WHERE id = ?1",
    )
    .and_then(|mut s| s.execute(params![id, due, why, exit_code, signal, output, truncated]))
    .map_err(Error::sqlite("recording a retry"))?;
    Ok(())
}

/// Deletes, of the `batch` oldest records, those that ended before `cutoff` (Unix µs) or
/// that are older than `oldest_kept`, in one short transaction. Returns how many
/// it deleted; the caller repeats while it deletes a whole batch. Running records, and
/// those of tasks waiting for a retry, are never pruned.
///
/// Only the oldest `batch` rows are looked at: records end roughly in id order, so what
/// may go is at the front, and a look past it would scan the whole table in the write
/// transaction whenever nothing qualifies — each heartbeat, holding the write lock for
/// milliseconds per 10,000 records while the loop's claims waited. A record that ended
/// long before older ones (a short task beside a long one) goes once those have gone.
///
/// `oldest_kept` is `oldest_of_newest` for `--history-max-rows`, read once per pass.
pub fn prune(
    conn: &Connection,
    cutoff: i64,
    oldest_kept: Option<i64>,
    batch: i64,
) -> Result<usize> {
    conn.prepare_cached(
        "DELETE FROM task_records WHERE id IN (SELECT id FROM \
         (SELECT id, state, finished_at FROM task_records ORDER BY id LIMIT ?3) \
         WHERE state NOT IN ('running', 'queued') AND (finished_at < ?1 OR id < ?2))",
    )
    .and_then(|mut s| s.execute(params![cutoff, oldest_kept.unwrap_or(i64::MIN), batch]))
    .map_err(Error::sqlite("pruning task records"))
}

/// The id of the oldest of the newest `max_rows` records, when there are more: a read,
/// outside the pruning's write transaction. Ids of the SQLite queue are dense (a span of
/// ids no larger than `max_rows` holds no more records, and nothing is walked); those of a
/// broker's tasks are not (src/backend/rabbitmq.rs), and then the read steps through up
/// to `max_rows` entries of the table's index.
pub fn oldest_of_newest(conn: &Connection, max_rows: i64) -> Result<Option<i64>> {
    let span: Option<i64> = conn
        .prepare_cached("SELECT max(id) - min(id) FROM task_records")
        .and_then(|mut s| s.query_row([], |r| r.get(0)))
        .map_err(Error::sqlite("reading the records' ids"))?;
    if span.is_none_or(|span| span < max_rows) {
        return Ok(None);
    }
    conn.prepare_cached("SELECT id FROM task_records ORDER BY id DESC LIMIT 1 OFFSET ?1")
        .and_then(|mut s| s.query_row([max_rows - 1], |r| r.get(0)).optional())
        .map_err(Error::sqlite("reading the records' ids"))
}

/// How many tasks ended in each of the states that need a look (`failed`, `panicked`,
/// `rejected`, `timed_out`, `lost`, `abandoned`, `dead`) since `since` (Unix µs), for `status`.
pub fn trouble_since(conn: &Connection, since: i64) -> Result<Trouble> {
    let mut trouble = Trouble::default();
    let mut stmt = conn
        .prepare_cached(
            "SELECT state, count(*) FROM task_records WHERE finished_at >= ?1 \
             AND state IN ('failed', 'panicked', 'rejected', 'timed_out', 'lost', 'abandoned', \
             'dead') \
             GROUP BY state",
        )
        .map_err(Error::sqlite("counting recent failures"))?;
    let rows = stmt
        .query_map([since], |r| {
            Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?))
        })
        .map_err(Error::sqlite("counting recent failures"))?;
    for row in rows {
        let (state, n) = row.map_err(Error::sqlite("counting recent failures"))?;
        match state.as_str() {
            "lost" => trouble.lost = n,
            "abandoned" => trouble.abandoned = n,
            "dead" => trouble.dead = n,
            _ => trouble.failed += n,
        }
    }
    Ok(trouble)
}

/// Tasks that ended badly in a recent stretch (`trouble_since`).
#[derive(Debug, Clone, Copy, Default, Serialize, PartialEq, Eq)]
pub struct Trouble {
    /// Failed, panicked, rejected or timed out.
    pub failed: i64,
    pub lost: i64,
    pub abandoned: i64,
    /// At-least-once tasks whose last attempt failed.
    pub dead: i64,
}

/// What became of a task that was running when its foreman died.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Orphan {
    pub id: i64,
    pub task: String,
    /// `lost` (at most once: not run again), `queued` (a lease, rescued: back in the queue
    /// with its next attempt) or `dead` (a lease whose last attempt it was).
    pub state: String,
}

/// Settles every record still `running` whose foreman is not among `alive` (the pids of
/// foremen running on this database now, this one included), in one transaction: an
/// at-most-once task is marked `lost`; a leased one (invariant 10) goes back in the queue,
/// due now, with its next attempt, or is `dead` if that was its last. Returns each, for
/// the log.
pub fn mark_lost(conn: &Connection, alive: &[u32]) -> Result<Vec<Orphan>> {
    let orphaned = orphaned(alive);
    let now = now_micros();
    db::immediate(conn, "settling lost tasks", || {
        conn.execute(
            &format!(
                "INSERT OR IGNORE INTO tasks (id, task_name, args, kwargs, created_at, \
                 run_at, attempt) SELECT id, task_name, args, kwargs, enqueued_at, ?1, \
                 attempt + 1 FROM task_records WHERE {orphaned} \
                 AND attempt < coalesce(max_attempts, 1)"
            ),
            [now],
        )
        .map_err(Error::sqlite("putting rescued tasks back in the queue"))?;
        let mut stmt = conn
            .prepare(&format!(
                "UPDATE task_records SET \
                 state = CASE WHEN max_attempts IS NULL THEN 'lost' \
                     WHEN attempt < max_attempts THEN 'queued' ELSE 'dead' END, \
                 finished_at = CASE WHEN attempt < coalesce(max_attempts, 1) \
                     THEN NULL ELSE ?1 END, \
                 started_at = CASE WHEN attempt < coalesce(max_attempts, 1) \
                     THEN NULL ELSE started_at END, \
                 due_at = CASE WHEN attempt < coalesce(max_attempts, 1) \
                     THEN ?1 ELSE due_at END, \
                 error = 'its foreman (pid ' || coalesce(foreman_pid, '?') || \
                     ') ended while attempt ' || attempt || ' ran', \
                 attempt = CASE WHEN attempt < coalesce(max_attempts, 1) \
                     THEN attempt + 1 ELSE attempt END \
                 WHERE {orphaned} RETURNING id, task_name, state"
            ))
            .map_err(Error::sqlite("finding lost tasks"))?;
        orphans_of(&mut stmt, now)
    })
}

/// Like `mark_lost`, for tasks whose queue is a broker, which hands a dead consumer's
/// leases out again by itself: an at-most-once task is `lost`, a leased one `abandoned`
/// here (its next attempt is recorded by whichever foreman the broker gives it to).
pub fn mark_lost_of_broker(conn: &Connection, alive: &[u32]) -> Result<Vec<Orphan>> {
    let orphaned = orphaned(alive);
    let mut stmt = conn
        .prepare(&format!(
            "UPDATE task_records SET \
             state = CASE WHEN max_attempts IS NULL THEN 'lost' ELSE 'abandoned' END, \
             finished_at = ?1, \
             error = 'its foreman (pid ' || coalesce(foreman_pid, '?') || \
                 ') ended while attempt ' || attempt || ' ran' || \
                 CASE WHEN max_attempts IS NULL THEN '' \
                 ELSE '; the broker hands it out again' END \
             WHERE {orphaned} RETURNING id, task_name, state"
        ))
        .map_err(Error::sqlite("finding lost tasks"))?;
    orphans_of(&mut stmt, now_micros())
}

/// Runs an `UPDATE … RETURNING id, task_name, state` of orphaned records at `now`.
fn orphans_of(stmt: &mut rusqlite::Statement<'_>, now: i64) -> Result<Vec<Orphan>> {
    let rows = stmt
        .query_map([now], |r| {
            Ok(Orphan {
                id: r.get(0)?,
                task: r.get(1)?,
                state: r.get(2)?,
            })
        })
        .map_err(Error::sqlite("finding lost tasks"))?;
    rows.collect::<rusqlite::Result<Vec<_>>>()
        .map_err(Error::sqlite("finding lost tasks"))
}

/// Sets the records of `ids` that are `running` to `state` (`queued`: handed back
/// unstarted; `lost`), with `error` (none if empty).
pub fn set_state(conn: &Connection, ids: &[i64], state: &str, error: &str) -> Result<()> {
    let mut stmt = conn
        .prepare_cached(
            "UPDATE task_records SET state = ?2, error = nullif(?3, ''), \
             started_at = CASE WHEN ?2 = 'queued' THEN NULL ELSE started_at END, \
             foreman_pid = CASE WHEN ?2 = 'queued' THEN NULL ELSE foreman_pid END, \
             finished_at = CASE WHEN ?2 = 'queued' THEN NULL ELSE ?4 END \
             WHERE id = ?1 AND state = 'running'",
        )
        .map_err(Error::sqlite("updating records"))?;
    let now = now_micros();
    for id in ids {
        stmt.execute(params![id, state, error, now])
            .map_err(Error::sqlite("updating records"))?;
    }
    Ok(())
}

/// Deletes the `running` records of `ids`: tasks claimed and handed back before they
/// started (a broker's message whose ack could not be sent), of which this machine has
/// nothing to tell.
pub fn forget_running(conn: &Connection, ids: &[i64]) -> Result<()> {
    let mut stmt = conn
        .prepare_cached("DELETE FROM task_records WHERE id = ?1 AND state = 'running'")
        .map_err(Error::sqlite("forgetting records"))?;
    for id in ids {
        stmt.execute([id])
            .map_err(Error::sqlite("forgetting records"))?;
    }
    Ok(())
}

/// The condition for records left `running` by foremen not among `alive`.
fn orphaned(alive: &[u32]) -> String {
    let alive = alive
        .iter()
        .map(u32::to_string)
        .collect::<Vec<_>>()
        .join(",");
    format!("state = 'running' AND coalesce(foreman_pid, -1) NOT IN ({alive})")
}

/// One task as `show` and `history` print it (SPEC's fields).
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Record {
    pub id: i64,
    pub task: String,
    pub args: serde_json::Value,
    pub kwargs: serde_json::Value,
    pub state: String,
    pub attempt: i64,
    pub enqueued_at: Option<String>,
    pub due_at: Option<String>,
    pub started_at: Option<String>,
    pub finished_at: Option<String>,
    pub duration_seconds: Option<f64>,
    pub error: Option<String>,
    pub exit_code: Option<i64>,
    pub signal: Option<String>,
    /// A command task's output tail (stdout and stderr as they came), invalid UTF-8
    /// replaced; `snapq logs` prints the bytes themselves.
    pub output: Option<String>,
    /// Whether output before that tail was dropped (past the task's `output_bytes`).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub output_truncated: bool,
    /// The foreman that ran (or runs) it, while it has one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub foreman_pid: Option<i64>,
    /// The host whose foreman ran it, when the record came from another machine (with the
    /// queue on RabbitMQ, from the outcome that foreman published): that host's own
    /// records have the arguments and the output.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub recorded_on: Option<String>,
}

const RECORD_COLUMNS: &str = "id, task_name, args, kwargs, state, attempt, enqueued_at, due_at, \
     started_at, finished_at, error, exit_code, signal, output, foreman_pid, output_truncated";

fn record_of(r: &rusqlite::Row) -> rusqlite::Result<Record> {
    let json =
        |text: String| serde_json::from_str(&text).unwrap_or(serde_json::Value::String(text));
    let started: Option<i64> = r.get(8)?;
    let finished: Option<i64> = r.get(9)?;
    Ok(Record {
        id: r.get(0)?,
        task: r.get(1)?,
        args: json(r.get(2)?),
        kwargs: json(r.get(3)?),
        state: r.get(4)?,
        attempt: r.get(5)?,
        enqueued_at: Some(format_micros(r.get(6)?)),
        due_at: Some(format_micros(r.get(7)?)),
        started_at: started.map(format_micros),
        finished_at: finished.map(format_micros),
        duration_seconds: started
            .zip(finished)
            .map(|(s, f)| (f - s).max(0) as f64 / 1e6),
        error: r.get(10)?,
        exit_code: r.get(11)?,
        signal: r.get(12)?,
        output: bytes_of(r.get_ref(13)?).map(|b| String::from_utf8_lossy(b).into_owned()),
        foreman_pid: r.get(14)?,
        output_truncated: r.get::<_, Option<bool>>(15)?.unwrap_or(false),
        recorded_on: None,
    })
}

/// A column's bytes, whether it holds a BLOB (what the foreman writes) or TEXT.
fn bytes_of(value: rusqlite::types::ValueRef<'_>) -> Option<&[u8]> {
    match value {
        rusqlite::types::ValueRef::Blob(b) | rusqlite::types::ValueRef::Text(b) => Some(b),
        _ => None,
    }
}

/// A task's output as the command wrote it, for `snapq logs`: None if there is no record
/// of the task, Some(empty) if it has no output (not a command task, or not ended yet).
pub fn output(conn: &Connection, id: i64) -> Result<Option<Vec<u8>>> {
    conn.query_row("SELECT output FROM task_records WHERE id = ?1", [id], |r| {
        Ok(bytes_of(r.get_ref(0)?)
            .map(<[u8]>::to_vec)
            .unwrap_or_default())
    })
    .optional()
    .map_err(Error::sqlite("reading a task's output"))
}

/// What `show` and `/api/tasks/<id>` say of an id with neither a queued row nor a record.
pub fn not_found_message(id: i64) -> String {
    format!("no task {id} (never enqueued here, or its record was pruned)")
}

/// Task `id` wherever it is: still queued (state `queued`), or its record.
pub fn show(conn: &Connection, id: i64) -> Result<Option<Record>> {
    let queued = conn
        .query_row(
            // A task waiting for its next attempt has a record too: the last one's error.
            "SELECT t.id, t.task_name, t.args, t.kwargs, t.created_at, \
             coalesce(t.run_at, t.created_at), t.attempt, r.error \
             FROM tasks t LEFT JOIN task_records r ON r.id = t.id WHERE t.id = ?1",
            [id],
            |r| {
                let text = |i: usize| -> rusqlite::Result<String> {
                    Ok(match r.get_ref(i)? {
                        rusqlite::types::ValueRef::Text(t) | rusqlite::types::ValueRef::Blob(t) => {
                            String::from_utf8_lossy(t).into_owned()
                        }
                        other => format!("{other:?}"),
                    })
                };
                let time = |i: usize| -> rusqlite::Result<Option<String>> {
                    Ok(match r.get_ref(i)? {
                        rusqlite::types::ValueRef::Integer(t) => Some(format_micros(t)),
                        rusqlite::types::ValueRef::Real(t) => Some(format_micros(t as i64)),
                        _ => None,
                    })
                };
                let json =
                    |t: String| serde_json::from_str(&t).unwrap_or(serde_json::Value::String(t));
                Ok(Record {
                    id: r.get(0)?,
                    task: text(1)?,
                    args: json(text(2)?),
                    kwargs: json(text(3)?),
                    state: "queued".into(),
                    attempt: match r.get_ref(6)? {
                        rusqlite::types::ValueRef::Integer(a) if a >= 1 => a,
                        _ => 1,
                    },
                    enqueued_at: time(4)?,
                    due_at: time(5)?,
                    started_at: None,
                    finished_at: None,
                    duration_seconds: None,
                    error: r.get(7)?,
                    exit_code: None,
                    signal: None,
                    output: None,
                    output_truncated: false,
                    foreman_pid: None,
                    recorded_on: None,
                })
            },
        )
        .optional()
        .map_err(Error::sqlite("reading the queue"))?;
    if queued.is_some() {
        return Ok(queued);
    }
    conn.query_row(
        &format!("SELECT {RECORD_COLUMNS} FROM task_records WHERE id = ?1"),
        [id],
        record_of,
    )
    .optional()
    .map_err(Error::sqlite("reading the task's record"))
}

/// Which records `history` returns.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    /// Any of these states (none: every state).
    pub states: Vec<String>,
    pub task: Option<String>,
    /// Only records that started or finished at or after this time (Unix µs).
    pub since: Option<i64>,
    pub limit: usize,
}

/// Records, newest first.
pub fn history(conn: &Connection, filter: &Filter) -> Result<Vec<Record>> {
    let states = if filter.states.is_empty() {
        None
    } else {
        Some(serde_json::to_string(&filter.states).unwrap_or_default())
    };
    let mut stmt = conn
        .prepare(&format!(
            "SELECT {RECORD_COLUMNS} FROM task_records \
             WHERE (?1 IS NULL OR state IN (SELECT value FROM json_each(?1))) \
             AND (?2 IS NULL OR task_name = ?2) \
             AND (?3 IS NULL OR coalesce(finished_at, started_at, enqueued_at) >= ?3) \
             ORDER BY id DESC LIMIT ?4"
        ))
        .map_err(Error::sqlite("reading the history"))?;
    let rows = stmt
        .query_map(
            params![states, filter.task, filter.since, filter.limit as i64],
            record_of,
        )
        .map_err(Error::sqlite("reading the history"))?;
    rows.collect::<rusqlite::Result<Vec<_>>>()
        .map_err(Error::sqlite("reading the history"))
}

/// What `cancel` did with one id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Cancelled {
    /// It was queued; it is gone from the queue, recorded `cancelled`.
    Done,
    /// It is running: at most once, it cannot be taken back.
    Running,
    /// It already ended, in this state.
    Ended(String),
    /// No such task.
    Unknown,
}

/// Removes queued task `id` from the queue and records it `cancelled`, in one transaction.
pub fn cancel(conn: &Connection, id: i64) -> Result<Cancelled> {
    db::immediate(conn, "the cancel", || {
        let removed = conn
            .query_row(
                "DELETE FROM tasks WHERE id = ?1 RETURNING task_name, args, kwargs, created_at, \
                 coalesce(run_at, created_at)",
                [id],
                |r| {
                    Ok((
                        r.get::<_, String>(0)?,
                        r.get::<_, String>(1)?,
                        r.get::<_, String>(2)?,
                        r.get::<_, i64>(3)?,
                        r.get::<_, i64>(4)?,
                    ))
                },
            )
            .optional()
            .map_err(Error::sqlite("removing the task from the queue"))?;
        if let Some((task, args, kwargs, created, due)) = removed {
            conn.execute(
                "INSERT OR REPLACE INTO task_records (id, task_name, args, kwargs, enqueued_at, \
                 due_at, finished_at, state) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, 'cancelled')",
                params![id, task, args, kwargs, created, due, now_micros()],
            )
            .map_err(Error::sqlite("recording the cancel"))?;
            return Ok(Cancelled::Done);
        }
        let state: Option<String> = conn
            .query_row("SELECT state FROM task_records WHERE id = ?1", [id], |r| {
                r.get(0)
            })
            .optional()
            .map_err(Error::sqlite("reading the task's record"))?;
        Ok(match state {
            Some(s) if s == "running" => Cancelled::Running,
            Some(s) => Cancelled::Ended(s),
            None => Cancelled::Unknown,
        })
    })
}

/// The states `snapq retry` takes a task from.
pub const RETRYABLE: [&str; 5] = ["failed", "dead", "lost", "abandoned", "timed_out"];

/// What `retry` did with one id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Retried {
    /// Back in the queue, due now, as this attempt.
    Queued { attempt: i64 },
    /// Its record is in a state `retry` does not take it from (running, queued,
    /// succeeded, …).
    Refused(String),
    /// No such task.
    Unknown,
}

/// A task `retry` puts back: its record's task and arguments under its id, with its next
/// attempt, due now.
#[derive(Debug, Clone)]
pub struct Again {
    pub id: i64,
    pub task_name: String,
    pub args: String,
    pub kwargs: String,
    pub attempt: i64,
    pub due: i64,
}

/// Puts task `id` back in the database's queue, due now, under its own id with its next
/// attempt, if its record says it ended `failed`, `dead`, `lost`, `abandoned` or
/// `timed_out`; the record says `queued` until a foreman claims it. One transaction. The
/// caller wakes the foreman after it.
pub fn retry(conn: &Connection, id: i64) -> Result<Retried> {
    retry_into(conn, id, None, |conn, again| {
        back_in_queue(conn, again.id, again.due)
    })
}

/// `retry` with the queue elsewhere: `put_back` sends the task to it (a broker's confirmed
/// publish) inside the transaction that marks the record `queued`, with `note` as its
/// error text, so a task that could not be put back leaves its record as it was.
pub fn retry_into(
    conn: &Connection,
    id: i64,
    note: Option<&str>,
    put_back: impl FnOnce(&Connection, &Again) -> Result<()>,
) -> Result<Retried> {
    db::immediate(conn, "the retry", || {
        let record: Option<(String, i64, String, String, String)> = conn
            .query_row(
                "SELECT state, attempt, task_name, args, kwargs FROM task_records \
                 WHERE id = ?1",
                [id],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?)),
            )
            .optional()
            .map_err(Error::sqlite("reading the task's record"))?;
        let Some((state, attempt, task_name, args, kwargs)) = record else {
            let queued = conn
                .query_row("SELECT 1 FROM tasks WHERE id = ?1", [id], |_| Ok(()))
                .optional()
                .map_err(Error::sqlite("reading the queue"))?;
            return Ok(match queued {
                Some(()) => Retried::Refused("queued".into()),
                None => Retried::Unknown,
            });
        };
        if !RETRYABLE.contains(&state.as_str()) {
            return Ok(Retried::Refused(state));
        }
        let again = Again {
            id,
            task_name,
            args,
            kwargs,
            attempt: attempt + 1,
            due: now_micros(),
        };
        put_back(conn, &again)?;
        conn.execute(
            "UPDATE task_records SET state = 'queued', attempt = ?2, due_at = ?3, \
             started_at = NULL, finished_at = NULL, error = coalesce(?4, error) WHERE id = ?1",
            params![id, again.attempt, again.due, note],
        )
        .map_err(Error::sqlite("recording the retry"))?;
        Ok(Retried::Queued {
            attempt: again.attempt,
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `--history-max-rows` counts records, not ids: a broker's task ids are far apart.
    #[test]
    fn pruning_keeps_the_newest_records_whatever_their_ids() {
        let dir = tempfile::tempdir().unwrap();
        let conn = db::open(&dir.path().join("q.sqlite3"), db::Synchronous::Normal).unwrap();
        let now = now_micros();
        for id in [10_i64, 5_000, 900_000, 4_000_000, 120_210_147_745_449] {
            conn.execute(
                "INSERT INTO task_records (id, task_name, args, kwargs, enqueued_at, due_at, \
                 finished_at, state) VALUES (?1, 'noop', '[]', '{}', ?2, ?2, ?2, 'succeeded')",
                params![id, now],
            )
            .unwrap();
        }
        let ids = |conn: &Connection| -> Vec<i64> {
            let mut s = conn
                .prepare("SELECT id FROM task_records ORDER BY id")
                .unwrap();
            s.query_map([], |r| r.get(0))
                .unwrap()
                .map(|r| r.unwrap())
                .collect()
        };
        // Five records, five kept: nothing is pruned for the ids' span alone.
        let floor = oldest_of_newest(&conn, 5).unwrap();
        assert_eq!(prune(&conn, now - 1, floor, 250).unwrap(), 0);
        assert_eq!(ids(&conn).len(), 5);
        let floor = oldest_of_newest(&conn, 2).unwrap();
        assert_eq!(floor, Some(4_000_000));
        assert_eq!(prune(&conn, now - 1, floor, 250).unwrap(), 3);
        assert_eq!(ids(&conn), [4_000_000, 120_210_147_745_449]);
        // Dense ids under the limit: not even walked.
        assert_eq!(oldest_of_newest(&conn, 100).unwrap(), None);
    }
}
