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
use crate::error::{Error, Result};
use crate::pool::CommandEnd;
use crate::queue::Claimed;

/// Every state a task can be in, as `show` and `history` name them.
pub const STATES: [&str; 10] = [
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
pub fn claim(
    conn: &Connection,
    finished: &mut Vec<Finish>,
    claimer: &Claimer,
    claim: impl FnOnce(&Connection) -> Result<Vec<Claimed>>,
) -> Result<Vec<Claimed>> {
    run(conn, "BEGIN IMMEDIATE").map_err(Error::sqlite("starting the claim"))?;
    let result = (|| {
        write_finished(conn, finished)?;
        let claimed = claim(conn)?;
        let now = now_micros();
        let mut insert = conn
            .prepare_cached(
                "INSERT OR REPLACE INTO task_records (id, task_name, args, kwargs, enqueued_at, \
                 due_at, started_at, state, foreman_pid, host) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, 'running', ?8, ?9)",
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
                    claimer.host
                ])
                .map_err(Error::sqlite("recording a claimed task"))?;
        }
        Ok(claimed)
    })();
    match result {
        Ok(claimed) => {
            run(conn, "COMMIT").map_err(Error::sqlite("committing the claim"))?;
            finished.clear();
            Ok(claimed)
        }
        Err(e) => {
            let _ = run(conn, "ROLLBACK");
            Err(e)
        }
    }
}

/// Runs a transaction-control statement from the connection's statement cache: the claim
/// runs thousands of times a second, and parsing BEGIN and COMMIT each time shows.
fn run(conn: &Connection, sql: &str) -> rusqlite::Result<()> {
    conn.prepare_cached(sql)?.execute([]).map(drop)
}

/// Writes the final states in `finished` in a transaction of their own, emptying it.
pub fn settle(conn: &Connection, finished: &mut Vec<Finish>) -> Result<()> {
    if finished.is_empty() {
        return Ok(());
    }
    conn.execute_batch("BEGIN IMMEDIATE")
        .map_err(Error::sqlite("starting to record finished tasks"))?;
    match write_finished(conn, finished) {
        Ok(()) => {
            conn.execute_batch("COMMIT")
                .map_err(Error::sqlite("committing finished tasks"))?;
            finished.clear();
            Ok(())
        }
        Err(e) => {
            let _ = conn.execute_batch("ROLLBACK");
            Err(e)
        }
    }
}

fn write_finished(conn: &Connection, finished: &[Finish]) -> Result<()> {
    let mut update = conn
        .prepare_cached(
            "UPDATE task_records SET state = ?2, error = ?3, finished_at = ?4, \
             started_at = CASE WHEN ?2 = 'rejected' THEN NULL ELSE started_at END, \
             exit_code = ?5, signal = ?6, output = ?7, output_truncated = ?8 \
             WHERE id = ?1 AND state = 'running'",
        )
        .map_err(Error::sqlite("preparing the record update"))?;
    for f in finished {
        let c = f.command.as_deref();
        update
            .execute(params![
                f.id,
                f.state,
                f.error,
                f.at,
                c.and_then(|c| c.exit_code),
                c.and_then(|c| c.signal.as_deref()),
                c.map(|c| c.output.as_slice()),
                c.map(|c| c.truncated)
            ])
            .map_err(Error::sqlite("recording a finished task"))?;
    }
    Ok(())
}

/// Deletes, of the `batch` oldest records, those that ended before `cutoff` (Unix µs) or
/// whose id is more than `max_rows` below the newest record's, in one short transaction.
/// Returns how many it deleted; the caller repeats while it deletes a whole batch.
/// Running records are never pruned. Ids are the tasks' ids, dense but for tasks still
/// queued, so "more than `max_rows` below the newest" keeps about the newest `max_rows`.
///
/// Only the oldest `batch` rows are looked at: records end roughly in id order, so what
/// may go is at the front, and a look past it would scan the whole table in the write
/// transaction whenever nothing qualifies — each heartbeat, holding the write lock for
/// milliseconds per 10,000 records while the loop's claims waited. A record that ended
/// long before older ones (a short task beside a long one) goes once those have gone.
pub fn prune(conn: &Connection, cutoff: i64, max_rows: i64, batch: i64) -> Result<usize> {
    conn.prepare_cached(
        "DELETE FROM task_records WHERE id IN (SELECT id FROM \
         (SELECT id, state, finished_at FROM task_records ORDER BY id LIMIT ?3) \
         WHERE state != 'running' AND (finished_at < ?1 \
            OR id <= (SELECT max(id) FROM task_records) - ?2))",
    )
    .and_then(|mut s| s.execute(params![cutoff, max_rows, batch]))
    .map_err(Error::sqlite("pruning task records"))
}

/// How many tasks ended in each of the states that need a look (`failed`, `panicked`,
/// `rejected`, `timed_out`, `lost`, `abandoned`) since `since` (Unix µs), for `status`.
pub fn trouble_since(conn: &Connection, since: i64) -> Result<Trouble> {
    let mut trouble = Trouble::default();
    let mut stmt = conn
        .prepare_cached(
            "SELECT state, count(*) FROM task_records WHERE finished_at >= ?1 \
             AND state IN ('failed', 'panicked', 'rejected', 'timed_out', 'lost', 'abandoned') \
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
}

/// Marks `lost` every record still `running` whose foreman is not among `alive` (the pids
/// of foremen running on this database now, this one included). Returns the ids and task
/// names, for the log.
pub fn mark_lost(conn: &Connection, alive: &[u32]) -> Result<Vec<(i64, String)>> {
    let alive = alive
        .iter()
        .map(u32::to_string)
        .collect::<Vec<_>>()
        .join(",");
    let sql = format!(
        "UPDATE task_records SET state = 'lost', finished_at = ?1, \
         error = 'its foreman (pid ' || coalesce(foreman_pid, '?') || ') ended while it ran' \
         WHERE state = 'running' AND coalesce(foreman_pid, -1) NOT IN ({alive}) \
         RETURNING id, task_name"
    );
    let mut stmt = conn
        .prepare(&sql)
        .map_err(Error::sqlite("finding lost tasks"))?;
    let rows = stmt
        .query_map([now_micros()], |r| Ok((r.get(0)?, r.get(1)?)))
        .map_err(Error::sqlite("finding lost tasks"))?;
    rows.collect::<rusqlite::Result<Vec<_>>>()
        .map_err(Error::sqlite("finding lost tasks"))
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
            "SELECT id, task_name, args, kwargs, created_at, coalesce(run_at, created_at) \
             FROM tasks WHERE id = ?1",
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
                    attempt: 1,
                    enqueued_at: time(4)?,
                    due_at: time(5)?,
                    started_at: None,
                    finished_at: None,
                    duration_seconds: None,
                    error: None,
                    exit_code: None,
                    signal: None,
                    output: None,
                    output_truncated: false,
                    foreman_pid: None,
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
    conn.execute_batch("BEGIN IMMEDIATE")
        .map_err(Error::sqlite("starting the cancel"))?;
    let result = (|| {
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
    })();
    match result {
        Ok(outcome) => {
            conn.execute_batch("COMMIT")
                .map_err(Error::sqlite("committing the cancel"))?;
            Ok(outcome)
        }
        Err(e) => {
            let _ = conn.execute_batch("ROLLBACK");
            Err(e)
        }
    }
}
