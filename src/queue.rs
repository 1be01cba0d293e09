//! The queue table: enqueueing (single and bulk), claiming, and the counts `status` shows.
//!
//! Enqueueing validates everything first, writes in one transaction, then wakes the foreman
//! (src/wakeup.rs). Claiming is a `DELETE … RETURNING` statement: the rows are gone in the
//! same transaction that hands them out (invariant 1).
//!
//! Where a claim looks (migrations/0011): a row with `run_at` NULL is due now and waits in
//! the table's id order, which is the order rows were stored in; a delayed row waits in
//! the `tasks_delayed` index, by due time. A claim merges the two by due time (a row due
//! now counts as due when it was stored); while no delayed row is due, which is most of
//! the time, it deletes a range of ids without the merge. Walking the table by id, rather
//! than keeping an index of every row's due time, spares every claim the write of an
//! index page; a `Cursor` keeps the walk from passing the same delayed rows again on
//! every claim.

use std::collections::BTreeMap;
use std::io::BufRead;
use std::path::Path;
use std::time::Duration;

use rusqlite::types::ValueRef;
use rusqlite::{Connection, OptionalExtension, params};
use serde::Deserialize;
use serde_json::Value;

use crate::clock::{self, micros_of, now_micros};
use crate::db::{self, Synchronous};
use crate::error::{Error, Result};
use crate::registry::{Registry, TaskSpec};
use crate::wakeup::WakeDir;

/// When a new task becomes due.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub enum When {
    /// As soon as a worker is free.
    #[default]
    Now,
    /// After this long.
    After(Duration),
    /// At this Unix time, in microseconds.
    At(i64),
}

/// A task to enqueue.
#[derive(Debug, Clone, PartialEq)]
pub struct NewTask {
    pub task: String,
    /// A JSON array.
    pub args: Value,
    /// A JSON object.
    pub kwargs: Value,
    pub when: When,
}

impl NewTask {
    pub fn new(task: &str) -> NewTask {
        NewTask {
            task: task.to_owned(),
            args: Value::Array(Vec::new()),
            kwargs: Value::Object(Default::default()),
            when: When::Now,
        }
    }
}

/// One line of a bulk JSON Lines input (SPEC: `{"task", "args", "kwargs", "delay"}`).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Line {
    task: String,
    #[serde(default = "empty_array")]
    args: Value,
    #[serde(default = "empty_object")]
    kwargs: Value,
    #[serde(default)]
    delay: Option<f64>,
    #[serde(default)]
    at: Option<String>,
}

fn empty_array() -> Value {
    Value::Array(Vec::new())
}

fn empty_object() -> Value {
    Value::Object(Default::default())
}

/// The task names an enqueuer accepts: a registry's, plus those a foreman recorded in the
/// database (a program that embeds snapq with tasks of its own).
#[derive(Debug, Clone, Default)]
pub struct Catalog {
    specs: BTreeMap<String, TaskSpec>,
}

impl Catalog {
    pub fn from_registry(registry: &Registry) -> Catalog {
        Catalog {
            specs: registry
                .specs()
                .map(|s| (s.name.clone(), s.clone()))
                .collect(),
        }
    }

    /// Adds the task types recorded in the database; the registry's own win on conflict.
    /// Returns how many types foremen recorded there (0: no foreman ever opened it).
    pub fn add_recorded(&mut self, conn: &Connection) -> Result<usize> {
        let recorded = recorded_task_types(conn)?;
        let count = recorded.len();
        for spec in recorded {
            self.specs.entry(spec.name.clone()).or_insert(spec);
        }
        Ok(count)
    }

    pub fn specs(&self) -> impl Iterator<Item = &TaskSpec> {
        self.specs.values()
    }

    pub fn check(&self, task: &NewTask) -> Result<()> {
        let spec = self
            .specs
            .get(&task.task)
            .ok_or_else(|| Error::UnknownTask {
                name: task.task.clone(),
                known: self.specs.keys().cloned().collect::<Vec<_>>().join(", "),
            })?;
        spec.bind(&task.args, &task.kwargs).map(drop)
    }
}

/// An enqueuer: a connection, the wake-up directory and the names it accepts.
pub struct Enqueuer {
    conn: Connection,
    wake: WakeDir,
    catalog: Catalog,
    /// The ids the last bulk enqueue stored (`stored_ids`).
    last_stored: Option<std::ops::RangeInclusive<i64>>,
}

impl Enqueuer {
    /// Opens the database and checks the wake-up directory, accepting the built-in tasks and
    /// those recorded by foremen.
    pub fn open(db_path: &Path, wakeup_dir: &Path, synchronous: Synchronous) -> Result<Enqueuer> {
        Enqueuer::with_registry(db_path, wakeup_dir, synchronous, &Registry::with_builtins())
    }

    /// Like `open`, accepting the tasks of `registry` too.
    pub fn with_registry(
        db_path: &Path,
        wakeup_dir: &Path,
        synchronous: Synchronous,
        registry: &Registry,
    ) -> Result<Enqueuer> {
        let wake = WakeDir::prepare(wakeup_dir)?;
        let conn = db::open(db_path, synchronous)?;
        let mut catalog = Catalog::from_registry(registry);
        if catalog.add_recorded(&conn)? == 0 {
            // Every foreman records its task types when it starts: none here means no
            // foreman ever ran on this database, most often a mistyped --home.
            tracing::warn!(
                "no foreman has ever opened the database {}: the task waits there until one \
                 does. If your foreman runs elsewhere, give the same --home (SNAPQ_HOME) or \
                 --db as it has (a service's are in /etc/snapq/snapq.env)",
                db_path.display()
            );
        }
        Ok(Enqueuer {
            conn,
            wake,
            catalog,
            last_stored: None,
        })
    }

    pub fn catalog(&self) -> &Catalog {
        &self.catalog
    }

    /// Validates and stores one task, wakes the foreman, returns the task's id.
    pub fn enqueue(&mut self, task: &NewTask) -> Result<i64> {
        self.catalog.check(task)?;
        let now = now_micros();
        let row = Row::of(task, now)?;
        let id = {
            let mut insert = self
                .conn
                .prepare_cached(INSERT)
                .map_err(Error::sqlite("preparing the insert"))?;
            insert
                .insert(params![row.task, row.args, row.kwargs, now, row.run_at])
                .map_err(Error::sqlite("inserting the task"))?
        };
        self.wake.wake_after_commit("the task is");
        Ok(id)
    }

    /// Validates every task, then stores them all in one transaction with one wake-up.
    /// Returns how many were stored. Nothing is stored if any task is bad.
    pub fn enqueue_many(&mut self, tasks: &[NewTask]) -> Result<usize> {
        let now = now_micros();
        let mut rows = Vec::with_capacity(tasks.len());
        for (index, task) in tasks.iter().enumerate() {
            let at_line = |error| Error::BadLine {
                line: index + 1,
                source_name: "the input".into(),
                error: Box::new(error),
            };
            self.catalog.check(task).map_err(at_line)?;
            rows.push(Row::of(task, now).map_err(at_line)?);
        }
        self.store(&rows, now)
    }

    /// Reads JSON Lines (SPEC: `{"task", "args", "kwargs", "delay"}` a line; blank lines
    /// are skipped), validates all of it, and stores it in one transaction with one
    /// wake-up. An error names the line; then nothing is stored.
    pub fn enqueue_lines(&mut self, input: impl BufRead, source_name: &str) -> Result<usize> {
        let now = now_micros();
        let mut rows = Vec::new();
        read_lines(input, source_name, &self.catalog, |task, at_line| {
            rows.push(Row::of(&task, now).map_err(at_line)?);
            Ok(())
        })?;
        self.store(&rows, now)
    }

    /// The ids of the tasks the last `enqueue_many` or `enqueue_lines` stored, first to
    /// last: one transaction holds the write lock throughout, so they are consecutive
    /// (AUTOINCREMENT). `None` if it stored nothing.
    pub fn stored_ids(&self) -> Option<std::ops::RangeInclusive<i64>> {
        self.last_stored.clone()
    }

    fn store(&mut self, rows: &[Row], now: i64) -> Result<usize> {
        self.last_stored = store(&mut self.conn, &self.wake, rows, now)?;
        Ok(rows.len())
    }
}

/// Inserts `rows` in one transaction, then wakes the foreman; returns their ids, first to
/// last (consecutive: the transaction holds the write lock throughout, and ids are
/// AUTOINCREMENT). Rows must be checked already.
pub(crate) fn store(
    conn: &mut Connection,
    wake: &WakeDir,
    rows: &[Row],
    now: i64,
) -> Result<Option<std::ops::RangeInclusive<i64>>> {
    if rows.is_empty() {
        return Ok(None);
    }
    let tx = conn
        .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
        .map_err(Error::sqlite("starting the enqueue transaction"))?;
    let mut ids = None;
    {
        let mut insert = tx
            .prepare_cached(INSERT)
            .map_err(Error::sqlite("preparing the insert"))?;
        for row in rows {
            let id = insert
                .insert(params![row.task, row.args, row.kwargs, now, row.run_at])
                .map_err(Error::sqlite("inserting a task"))?;
            ids = Some(ids.map_or(id..=id, |ids: std::ops::RangeInclusive<i64>| {
                *ids.start()..=id
            }));
        }
    }
    tx.commit()
        .map_err(Error::sqlite("committing the enqueue"))?;
    wake.wake_after_commit(if rows.len() == 1 {
        "the task is"
    } else {
        "the tasks are"
    });
    Ok(ids)
}

const INSERT: &str =
    "INSERT INTO tasks (task_name, args, kwargs, created_at, run_at) VALUES (?1, ?2, ?3, ?4, ?5)";

/// A task as it is written: JSON already serialised.
pub(crate) struct Row {
    task: String,
    args: String,
    kwargs: String,
    run_at: Option<i64>,
}

impl Row {
    pub(crate) fn of(task: &NewTask, now: i64) -> Result<Row> {
        let run_at = match task.when {
            When::Now => None,
            When::After(d) => Some(now.saturating_add(micros_of(d))),
            When::At(at) => Some(at),
        };
        Ok(Row {
            task: task.task.clone(),
            args: task.args.to_string(),
            kwargs: task.kwargs.to_string(),
            run_at,
        })
    }
}

/// Reads JSON Lines (blank lines skipped), checks each task against `catalog`, and hands it
/// to `each` with what names its line in an error. The first bad line is the error.
pub fn read_lines(
    input: impl BufRead,
    source_name: &str,
    catalog: &Catalog,
    mut each: impl FnMut(NewTask, &dyn Fn(Error) -> Error) -> Result<()>,
) -> Result<()> {
    for (index, line) in input.lines().enumerate() {
        let at_line = |error| Error::BadLine {
            line: index + 1,
            source_name: source_name.to_owned(),
            error: Box::new(error),
        };
        let line =
            line.map_err(|e| at_line(Error::bad_input("input", format!("cannot be read: {e}"))))?;
        if line.trim().is_empty() {
            continue;
        }
        let task = parse_line(&line).map_err(at_line)?;
        catalog.check(&task).map_err(at_line)?;
        each(task, &at_line)?;
    }
    Ok(())
}

fn parse_line(text: &str) -> Result<NewTask> {
    let line: Line = serde_json::from_str(text).map_err(|e| {
        Error::bad_input(
            "JSON",
            format!(
                "{e}; each line must be an object like \
                 {{\"task\": \"noop\", \"args\": [], \"kwargs\": {{}}, \"delay\": 0}}"
            ),
        )
    })?;
    let when = match (line.delay, line.at) {
        (Some(_), Some(_)) => {
            return Err(Error::bad_input(
                "line",
                "give either \"delay\" or \"at\", not both",
            ));
        }
        (Some(delay), None) => When::After(clock::seconds("\"delay\"", delay)?),
        (None, Some(at)) => When::At(clock::parse_rfc3339_micros("\"at\"", &at)?),
        (None, None) => When::Now,
    };
    Ok(NewTask {
        task: line.task,
        args: line.args,
        kwargs: line.kwargs,
        when,
    })
}

/// Parses a JSON argument given on the command line (`--args`, `--kwargs`).
pub fn parse_json_arg(flag: &str, text: &str) -> Result<Value> {
    serde_json::from_str(text).map_err(|e| {
        Error::bad_input(
            flag,
            format!(
                "{text:?} is not valid JSON ({e}); quote it for the shell, e.g. {}",
                match flag {
                    "--args" => "'[1, \"a\"]'",
                    "--kwargs" => "'{\"seconds\": 2}'",
                    _ => "'{\"url\": \"http://127.0.0.1:8080/health\"}'",
                }
            ),
        )
    })
}

/// A claimed task, already deleted from the queue.
#[derive(Debug)]
pub struct Claimed {
    pub id: i64,
    pub task_name: String,
    pub args: String,
    pub kwargs: String,
    /// When it was enqueued (Unix µs): the start of its wait.
    pub created_at: i64,
    /// When it became due: `run_at`, or `created_at` if that is NULL.
    pub due: i64,
    /// Which run this is, from 1 (a retried task comes back with its next attempt).
    pub attempt: i64,
    /// Why the row cannot run as its writer wrote it (text that is not UTF-8, a time that
    /// is not a number), if so. The worker rejects such a task (invariant 7); the other rows
    /// claimed with it run as usual.
    pub unreadable: Option<String>,
}

/// Where a claim's walk of the rows due now starts: no row at a lower id has `run_at`
/// NULL, unless a program wrote it there with an id of its own choosing (ids given by
/// SQLite only grow: AUTOINCREMENT) or cleared a delayed row's `run_at` afterwards. Rows
/// snapq puts back under their old id carry a `run_at` (migrations/0011). The foreman
/// starts from 0 and goes back to 0 at each safety re-read, which finds such rows too.
#[derive(Debug, Clone, Copy, Default)]
pub struct Cursor {
    from: i64,
}

impl Cursor {
    /// Walk from the table's start again at the next claim.
    pub fn rewind(&mut self) {
        self.from = 0;
    }
}

/// Claims up to `limit` due tasks, oldest due first, deleting them in the statement that
/// returns them (one statement in autocommit mode is one transaction; when a delayed row
/// is due, a first statement takes nothing and a second claims). The rows are committed
/// as gone when this returns, before any of them runs (invariant 1). Public for the
/// benchmark that measures the raw claim rate; in a running system only the foreman loop
/// claims (invariant 8).
///
/// Rows written by other programs are read as SQLite's type affinity allows: a REAL time
/// is a time, a BLOB holding UTF-8 is text. A row that cannot be read still comes back,
/// with `unreadable` saying why, so that it is rejected on its own: the statement deleted
/// every row it returns at its first step, so a row that failed the whole claim would take
/// the good rows of its batch with it. Rows whose `run_at` is text or a BLOB never compare
/// as due: `claim_undated` takes those.
#[doc(hidden)]
pub fn claim(
    conn: &Connection,
    now: i64,
    limit: usize,
    cursor: &mut Cursor,
) -> Result<Vec<Claimed>> {
    if limit == 0 {
        return Ok(Vec::new());
    }
    // Most claims find no delayed row due: then the rows due now are one range of ids,
    // deleted without the merge (whose temporary tables cost more than the rest of the
    // statement). It takes nothing when a delayed row is due, and the merge runs.
    let mut claimed = run_claim(conn, CLAIM_RANGE, params![now, limit as i64, cursor.from])?;
    if claimed.is_empty() {
        claimed = run_claim(conn, CLAIM, params![now, limit as i64, cursor.from])?;
    }
    if claimed.len() < limit {
        // Fewer than asked: the walk reached the table's end and every row due now it met
        // is claimed, so every row left is delayed.
        let last: Option<i64> = conn
            .prepare_cached("SELECT max(id) FROM tasks")
            .and_then(|mut s| s.query_row([], |r| r.get(0)))
            .map_err(Error::sqlite("reading the queue's last id"))?;
        if let Some(last) = last {
            cursor.from = cursor.from.max(last + 1);
        }
    } else if let Some(top) = claimed
        .iter()
        .filter(|(_, now)| *now)
        .map(|(t, _)| t.id)
        .max()
    {
        // The rows due now that a claim takes are the first of the walk (they share one
        // order key, so the id decides among them): none is left below `top`.
        cursor.from = cursor.from.max(top + 1);
    }
    Ok(claimed.into_iter().map(|(task, _)| task).collect())
}

/// Runs a claim statement; each row comes with whether it was due now (`run_at` NULL).
fn run_claim(
    conn: &Connection,
    sql: &str,
    params: impl rusqlite::Params,
) -> Result<Vec<(Claimed, bool)>> {
    let mut stmt = conn
        .prepare_cached(sql)
        .map_err(Error::sqlite("preparing the claim"))?;
    let rows = stmt
        .query_map(params, |r| {
            Ok((read_claimed(r)?, r.get_ref(5)? == ValueRef::Null))
        })
        .map_err(Error::sqlite("claiming tasks"))?;
    // Collecting steps the statement to its end, which commits it. `read_claimed` fails
    // only if SQLite does, never on a row's contents.
    rows.collect::<rusqlite::Result<Vec<_>>>()
        .map_err(Error::sqlite("claiming tasks"))
}

/// Claims up to `limit` rows whose `run_at` is text or a BLOB (a writer's mistake: they
/// never compare as due), each flagged unreadable, to be rejected. The foreman sweeps for
/// them at start and at each safety re-read, not on every claim: they are rare, and the
/// wake-up path need not look for them.
pub(crate) fn claim_undated(conn: &Connection, limit: usize) -> Result<Vec<Claimed>> {
    if !has_undated(conn)? {
        return Ok(Vec::new());
    }
    let claimed = run_claim(conn, CLAIM_UNDATED, params![limit as i64])?;
    Ok(claimed.into_iter().map(|(task, _)| task).collect())
}

/// Whether any row has a `run_at` that is not a number (text or a BLOB sorts after every
/// number, so this is one seek at the end of the `tasks_delayed` index).
fn has_undated(conn: &Connection) -> Result<bool> {
    let mut stmt = conn
        .prepare_cached("SELECT EXISTS (SELECT 1 FROM tasks WHERE run_at >= '')")
        .map_err(Error::sqlite("preparing the undated-row check"))?;
    stmt.query_row([], |r| r.get(0)).map_err(Error::sqlite(
        "looking for rows with a due time that is not a number",
    ))
}

/// One claimed row, whatever its writer put in it (see `claim`).
fn read_claimed(r: &rusqlite::Row) -> rusqlite::Result<Claimed> {
    let mut problems = Vec::new();
    let id = r.get(0)?;
    let task_name = read_text(r.get_ref(1)?, "task_name", &mut problems);
    let args = read_text(r.get_ref(2)?, "args", &mut problems);
    let kwargs = read_text(r.get_ref(3)?, "kwargs", &mut problems);
    let created_at = read_time(r.get_ref(4)?, "created_at", &mut problems).unwrap_or(0);
    let due = read_time(r.get_ref(5)?, "run_at", &mut problems).unwrap_or(created_at);
    // A writer's odd attempt (text, NULL) is taken as the first: the count only shapes
    // retries, and refusing the row for it would lose the task.
    let attempt = match r.get_ref(6)? {
        ValueRef::Integer(a) if a >= 1 => a,
        _ => 1,
    };
    Ok(Claimed {
        attempt,
        id,
        task_name,
        args,
        kwargs,
        created_at,
        due,
        unreadable: (!problems.is_empty()).then(|| {
            format!(
                "the row cannot be read: {}; writers must store text as UTF-8 and times as \
                 integer Unix microseconds (README, \"Enqueueing without snapq\")",
                problems.join("; ")
            )
        }),
    })
}

/// A text column: TEXT, or a BLOB holding UTF-8. Anything else is a problem (and reads as
/// its lossy text, so that the log can still name the task).
fn read_text(value: ValueRef, column: &str, problems: &mut Vec<String>) -> String {
    match value {
        ValueRef::Text(bytes) | ValueRef::Blob(bytes) => match std::str::from_utf8(bytes) {
            Ok(text) => text.to_owned(),
            Err(e) => {
                problems.push(format!("{column} is not UTF-8 ({e})"));
                String::from_utf8_lossy(bytes).into_owned()
            }
        },
        ValueRef::Integer(i) => i.to_string(),
        ValueRef::Real(f) => f.to_string(),
        ValueRef::Null => {
            problems.push(format!("{column} is NULL"));
            String::new()
        }
    }
}

/// A time column in Unix microseconds: an INTEGER, or a REAL (truncated). `None` for NULL
/// and for what is not a number (then a problem).
fn read_time(value: ValueRef, column: &str, problems: &mut Vec<String>) -> Option<i64> {
    match value {
        ValueRef::Integer(t) => Some(t),
        ValueRef::Real(t) if t.is_finite() => Some(t as i64),
        ValueRef::Null => None,
        ValueRef::Real(t) => {
            problems.push(format!("{column} is {t}"));
            None
        }
        ValueRef::Text(bytes) => {
            problems.push(format!(
                "{column} is the text {:?}, not a number",
                String::from_utf8_lossy(bytes)
            ));
            None
        }
        ValueRef::Blob(bytes) => {
            problems.push(format!("{column} is a BLOB of {} bytes", bytes.len()));
            None
        }
    }
}

/// The claim (see `claim` and `Cursor`): the delayed rows due by ?1 in due order, and the
/// first rows due now from id ?3 on, merged by due time; at most ?2 of them. The rows due
/// now all take the time the first of them was stored, so the merge takes the first rows
/// of the walk whatever their own `created_at` (concurrent enqueuers can commit in another
/// order than they read the clock): that is what lets the cursor move past them. So a
/// delayed row goes before every row due now that was stored after it came due, give or
/// take the rows of one claim, which start together anyway.
const CLAIM: &str = "DELETE FROM tasks WHERE id IN (SELECT id FROM (\
     SELECT id, due FROM (SELECT id, run_at AS due FROM tasks \
         WHERE run_at <= ?1 ORDER BY run_at, id LIMIT ?2) \
     UNION ALL \
     SELECT id, (SELECT created_at FROM tasks WHERE id >= ?3 AND run_at IS NULL \
             ORDER BY id LIMIT 1) \
         FROM (SELECT id FROM tasks WHERE id >= ?3 AND run_at IS NULL ORDER BY id LIMIT ?2) \
     ORDER BY 2, 1 LIMIT ?2)) \
     RETURNING id, task_name, args, kwargs, created_at, run_at, attempt";

/// The claim when no delayed row is due by ?1: the first ?2 rows due now from id ?3 on,
/// one range of ids (its end found by the walk, the rows past it left alone).
const CLAIM_RANGE: &str = "DELETE FROM tasks WHERE id >= ?3 AND run_at IS NULL \
     AND id <= coalesce((SELECT id FROM tasks WHERE id >= ?3 AND run_at IS NULL \
         ORDER BY id LIMIT 1 OFFSET ?2 - 1), 9223372036854775807) \
     AND NOT EXISTS (SELECT 1 FROM tasks WHERE run_at <= ?1) \
     RETURNING id, task_name, args, kwargs, created_at, run_at, attempt";

/// Rows whose `run_at` is text or a BLOB (see `has_undated`).
const CLAIM_UNDATED: &str = "DELETE FROM tasks WHERE id IN (SELECT id FROM tasks \
     WHERE run_at >= '' ORDER BY run_at, id LIMIT ?1) \
     RETURNING id, task_name, args, kwargs, created_at, run_at, attempt";

/// When the next task is due (Unix microseconds): now if a row due now is left from
/// `cursor` on, else the earliest delayed row's time. Rows whose `run_at` is not a number
/// sort last and give `None`: the foreman's sweep (`claim_undated`) takes them.
pub(crate) fn next_due(conn: &Connection, cursor: &Cursor) -> Result<Option<i64>> {
    let waiting: bool = conn
        .prepare_cached("SELECT EXISTS (SELECT 1 FROM tasks WHERE id >= ?1 AND run_at IS NULL)")
        .and_then(|mut s| s.query_row([cursor.from], |r| r.get(0)))
        .map_err(Error::sqlite("reading the next due time"))?;
    if waiting {
        return Ok(Some(now_micros()));
    }
    let mut stmt = conn
        .prepare_cached(
            "SELECT run_at FROM tasks WHERE run_at IS NOT NULL ORDER BY run_at, id LIMIT 1",
        )
        .map_err(Error::sqlite("preparing the next-due query"))?;
    stmt.query_row([], |r| Ok(due_time(r.get_ref(0)?)))
        .optional()
        .map(Option::flatten)
        .map_err(Error::sqlite("reading the next due time"))
}

/// A due time as the queries above return it: a number (a REAL one truncated), or `None`
/// for text or a BLOB, which only sorts first when no row has a number.
fn due_time(value: ValueRef) -> Option<i64> {
    match value {
        ValueRef::Integer(t) => Some(t),
        ValueRef::Real(t) => Some(t as i64),
        _ => None,
    }
}

/// Tasks due now, counted up to `cap` rows (a bounded cost for periodic samples).
pub fn count_due_capped(conn: &Connection, now: i64, cap: i64) -> Result<i64> {
    let mut stmt = conn
        .prepare_cached(
            "SELECT min(?2, (SELECT count(*) FROM (SELECT 1 FROM tasks WHERE run_at <= ?1 LIMIT ?2)) \
             + (SELECT count(*) FROM (SELECT 1 FROM tasks WHERE run_at IS NULL LIMIT ?2)))",
        )
        .map_err(Error::sqlite("preparing the due count"))?;
    stmt.query_row(params![now, cap], |r| r.get(0))
        .map_err(Error::sqlite("counting due tasks"))
}

/// Queue figures for `status`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Counts {
    pub due: i64,
    pub delayed: i64,
    /// When the oldest due task became due (Unix microseconds).
    pub oldest_due: Option<i64>,
    /// When the next delayed task becomes due (Unix microseconds).
    pub next_delayed: Option<i64>,
}

/// Rows whose `run_at` is not a number count as due: the foreman's next sweep (at start,
/// then at most a safety interval away) takes them. A row due now became due when it was
/// stored (`created_at`, or now if that is later or not a number).
pub fn counts(conn: &Connection, now: i64) -> Result<Counts> {
    let q = "SELECT (SELECT count(*) FROM tasks WHERE run_at IS NULL) \
                + (SELECT count(*) FROM tasks WHERE run_at <= ?1) \
                + (SELECT count(*) FROM tasks WHERE run_at >= ''), \
                (SELECT count(*) FROM tasks WHERE run_at > ?1 AND run_at < ''), \
                (SELECT run_at FROM tasks WHERE run_at IS NOT NULL ORDER BY run_at, id LIMIT 1), \
                (SELECT run_at FROM tasks WHERE run_at > ?1 AND run_at < '' ORDER BY run_at, id LIMIT 1), \
                EXISTS (SELECT 1 FROM tasks WHERE run_at IS NULL), \
                (SELECT min(created_at) FROM tasks WHERE run_at IS NULL)";
    conn.query_row(q, [now], |r| {
        let delayed_first = due_time(r.get_ref(2)?).filter(|&t| t <= now);
        let stored_first = due_time(r.get_ref(5)?).map_or(now, |t| t.min(now));
        let now_first = r.get::<_, bool>(4)?.then_some(stored_first);
        Ok(Counts {
            due: r.get(0)?,
            delayed: r.get(1)?,
            oldest_due: [delayed_first, now_first].into_iter().flatten().min(),
            next_delayed: due_time(r.get_ref(3)?),
        })
    })
    .map_err(Error::sqlite("counting tasks"))
}

/// How many queued tasks wait for a retry (attempt 2 or later), through the partial index
/// `tasks_retrying`.
pub fn count_retrying(conn: &Connection) -> Result<i64> {
    conn.query_row("SELECT count(*) FROM tasks WHERE attempt > 1", [], |r| {
        r.get(0)
    })
    .map_err(Error::sqlite("counting tasks waiting for a retry"))
}

/// The task types recorded by foremen (`task_types`).
pub fn recorded_task_types(conn: &Connection) -> Result<Vec<TaskSpec>> {
    let mut stmt = conn
        .prepare("SELECT name, summary, params FROM task_types ORDER BY name")
        .map_err(Error::sqlite("reading task types"))?;
    let rows = stmt
        .query_map([], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, String>(2)?,
            ))
        })
        .map_err(Error::sqlite("reading task types"))?;
    let mut specs = Vec::new();
    for row in rows {
        let (name, summary, params) = row.map_err(Error::sqlite("reading task types"))?;
        // A row we cannot read (written by hand, or by a future version) is skipped rather
        // than making every enqueue fail.
        if let Ok(params) = serde_json::from_str(&params) {
            // The retry policy is the foreman's business, not the enqueuer's.
            specs.push(TaskSpec {
                name,
                summary,
                params,
                retry: None,
            });
        }
    }
    Ok(specs)
}

/// Records a registry's task types, so that enqueuers know them (`Catalog`).
pub(crate) fn record_task_types(conn: &Connection, registry: &Registry) -> Result<()> {
    let now = now_micros();
    let mut stmt = conn
        .prepare(
            "INSERT INTO task_types (name, summary, params, updated_at) VALUES (?1, ?2, ?3, ?4) \
             ON CONFLICT (name) DO UPDATE SET summary = excluded.summary, \
             params = excluded.params, updated_at = excluded.updated_at",
        )
        .map_err(Error::sqlite("recording task types"))?;
    for spec in registry.specs() {
        let params = serde_json::to_string(&spec.params)
            .map_err(|e| Error::Runtime(format!("serialising task parameters: {e}")))?;
        stmt.execute(params![spec.name, spec.summary, params, now])
            .map_err(Error::sqlite("recording task types"))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn enqueuer(dir: &Path) -> Enqueuer {
        Enqueuer::open(
            &dir.join("q.sqlite3"),
            &dir.join("wakeup"),
            Synchronous::Normal,
        )
        .unwrap()
    }

    #[test]
    fn claims_in_due_order_and_deletes() {
        let dir = tempfile::tempdir().unwrap();
        let mut q = enqueuer(dir.path());
        let later = q
            .enqueue(&NewTask {
                when: When::After(Duration::from_secs(3600)),
                ..NewTask::new("noop")
            })
            .unwrap();
        let first = q.enqueue(&NewTask::new("noop")).unwrap();
        let second = q.enqueue(&NewTask::new("noop")).unwrap();
        assert!(dir.path().join("wakeup").join("wake").exists());
        let conn = db::open(&dir.path().join("q.sqlite3"), Synchronous::Normal).unwrap();
        let now = now_micros();
        let c = counts(&conn, now).unwrap();
        assert_eq!((c.due, c.delayed), (2, 1));
        let mut cursor = Cursor::default();
        let got = claim(&conn, now, 1, &mut cursor).unwrap();
        assert_eq!(got.iter().map(|c| c.id).collect::<Vec<_>>(), vec![first]);
        let got = claim(&conn, now, 10, &mut cursor).unwrap();
        assert_eq!(got.iter().map(|c| c.id).collect::<Vec<_>>(), vec![second]);
        assert!(claim(&conn, now, 10, &mut cursor).unwrap().is_empty());
        assert!(next_due(&conn, &cursor).unwrap().unwrap() > now);
        let got = claim(&conn, now + 3_601_000_000, 10, &mut cursor).unwrap();
        assert_eq!(got[0].id, later);
    }

    fn insert(conn: &Connection, id: i64, created_at: i64, run_at: Option<i64>) {
        conn.execute(
            "INSERT INTO tasks (id, task_name, created_at, run_at) VALUES (?1, 'noop', ?2, ?3)",
            params![id, created_at, run_at],
        )
        .unwrap();
    }

    fn ids(claimed: &[Claimed]) -> Vec<i64> {
        claimed.iter().map(|c| c.id).collect()
    }

    /// Two enqueuers can commit in another order than they read the clock: a row due now
    /// with an earlier `created_at` than the row before it, and a delayed row due between
    /// them. Nothing is left behind the cursor, and due order holds where it can.
    #[test]
    fn rows_stored_out_of_clock_order_are_not_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let conn = db::open(&dir.path().join("q.sqlite3"), Synchronous::Normal).unwrap();
        insert(&conn, 1, 200, None);
        insert(&conn, 2, 100, None);
        insert(&conn, 3, 0, Some(150));
        let mut cursor = Cursor::default();
        // Within a claim the order is the DELETE's (they all start at once).
        let mut got = ids(&claim(&conn, 1_000, 2, &mut cursor).unwrap());
        got.sort_unstable();
        assert_eq!(got, [1, 3]);
        got = ids(&claim(&conn, 1_000, 2, &mut cursor).unwrap());
        assert_eq!(got, [2]);
        let c = counts(&conn, 1_000).unwrap();
        assert_eq!((c.due, c.delayed), (0, 0));
    }

    /// Delayed rows below the rows due now are walked past once, not by every claim: with
    /// 20,000 of them first, the first claim runs more VM steps than that, the next ones a
    /// few hundred each.
    #[test]
    fn claims_do_not_walk_past_the_same_delayed_rows_again() {
        let dir = tempfile::tempdir().unwrap();
        let conn = db::open(&dir.path().join("q.sqlite3"), Synchronous::Normal).unwrap();
        conn.execute_batch("BEGIN").unwrap();
        for id in 1..=20_000 {
            insert(&conn, id, 1, Some(1_000_000_000));
        }
        for id in 20_001..=20_040 {
            insert(&conn, id, 2, None);
        }
        conn.execute_batch("COMMIT").unwrap();
        // VM steps of both claim statements since the last call.
        let steps = || -> i32 {
            [CLAIM_RANGE, CLAIM]
                .iter()
                .map(|sql| {
                    let stmt = conn.prepare_cached(sql).unwrap();
                    stmt.reset_status(rusqlite::StatementStatus::VmStep)
                })
                .sum()
        };
        let mut cursor = Cursor::default();
        let mut got = ids(&claim(&conn, 1_000, 4, &mut cursor).unwrap());
        let first = steps();
        assert!(first > 20_000, "the first claim ran {first} steps");
        for _ in 0..9 {
            got.extend(ids(&claim(&conn, 1_000, 4, &mut cursor).unwrap()));
        }
        assert_eq!(got, (20_001..=20_040).collect::<Vec<_>>());
        let later = steps();
        assert!(later < 9 * 1_000, "nine claims ran {later} VM steps");
        // A short claim moves past the delayed rows at the end as well.
        insert(&conn, 30_000, 1, Some(1_000_000_000));
        assert!(claim(&conn, 1_000, 4, &mut cursor).unwrap().is_empty());
        assert_eq!(next_due(&conn, &cursor).unwrap(), Some(1_000_000_000));
        // A row a program stores below the cursor is found once the walk starts over.
        insert(&conn, 40_000, 3, None);
        insert(&conn, 0, 3, None);
        assert_eq!(ids(&claim(&conn, 1_000, 4, &mut cursor).unwrap()), [40_000]);
        assert!(claim(&conn, 1_000, 4, &mut cursor).unwrap().is_empty());
        cursor.rewind();
        assert_eq!(ids(&claim(&conn, 1_000, 4, &mut cursor).unwrap()), [0]);
    }

    #[test]
    fn a_bad_line_stores_nothing_and_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let mut q = enqueuer(dir.path());
        let input =
            "{\"task\": \"noop\"}\n\n{\"task\": \"sleep\", \"kwargs\": {\"seconds\": \"x\"}}\n";
        let err = q.enqueue_lines(input.as_bytes(), "stdin").unwrap_err();
        assert!(err.to_string().starts_with("line 3 of stdin"), "{err}");
        let conn = db::open(&dir.path().join("q.sqlite3"), Synchronous::Normal).unwrap();
        assert_eq!(counts(&conn, now_micros()).unwrap().due, 0);
        let n = q
            .enqueue_lines(
                "{\"task\":\"noop\"}\n{\"task\":\"sleep\",\"args\":[0.1],\"delay\":5}\n".as_bytes(),
                "stdin",
            )
            .unwrap();
        assert_eq!(n, 2);
        let err = q
            .enqueue(&NewTask {
                args: json!([1]),
                ..NewTask::new("nope")
            })
            .unwrap_err();
        assert!(matches!(err, Error::UnknownTask { .. }));
    }
}

#[cfg(test)]
mod plan_tests {
    use super::*;

    /// The claim is planned once per connection, not once per claim (src/db.rs, QPSG).
    #[test]
    fn the_claim_statement_is_not_prepared_again_on_every_claim() {
        let dir = tempfile::tempdir().unwrap();
        let conn = crate::db::open(
            &dir.path().join("q.sqlite3"),
            crate::db::Synchronous::Normal,
        )
        .unwrap();
        for i in 0..200 {
            conn.execute(
                "INSERT INTO tasks (task_name, created_at) VALUES ('noop', ?1)",
                [i],
            )
            .unwrap();
        }
        let mut cursor = Cursor::default();
        for n in 0..20 {
            assert_eq!(claim(&conn, 1_000 + n, 4, &mut cursor).unwrap().len(), 4);
        }
        let stmt = conn.prepare_cached(CLAIM_RANGE).unwrap();
        assert_eq!(stmt.get_status(rusqlite::StatementStatus::Run), 20);
        assert_eq!(stmt.get_status(rusqlite::StatementStatus::RePrepare), 0);
    }
}
