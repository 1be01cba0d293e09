//! Schedules (issue 18): a task enqueued on a cron expression or at an interval, kept in
//! the `schedules` table (migrations/0009).
//!
//! A schedule's `next_fire` is the nominal time of its next tick. The foreman fires due
//! schedules with `fire_due`: in one transaction it enqueues each due tick's task and moves
//! `next_fire` past now. Two foremen serialise on SQLite's write lock, and the second reads
//! the moved `next_fire` inside its own transaction, so a tick is fired once; a crash
//! before the commit leaves both the task and the move undone, so the tick fires after the
//! restart instead. Ticks that passed while no foreman ran are handled by the schedule's
//! catch-up rule (`CatchUp`).
//!
//! With the queue on RabbitMQ the home's foreman fires the home's schedules, publishing the
//! ticks' tasks (confirmed by the broker) inside that transaction (`fire_due_into`): a
//! publish that fails leaves the schedule due, to fire at the next try; a crash between
//! the broker's confirm and the commit fires that tick again after the restart.
//!
//! Cron expressions have 5 fields (minute, hour, day of month, month, day of week) or a
//! name (`@hourly`, `@daily`, …) and are read by croner, in an IANA time zone through
//! jiff. Around daylight saving changes croner does what Vixie cron does: a time of day
//! skipped by the spring-forward fires once at the first valid minute after the gap; a
//! time in the repeated hour fires once, at its first occurrence; `*` and step fields fire
//! through the repeated hour in real time.

use std::time::Duration;

use croner::Cron;
use croner::parser::{CronParser, Seconds};
use jiff::Timestamp;
use jiff::tz::TimeZone;
use rusqlite::{Connection, OptionalExtension, params};
use serde::Serialize;
use serde_json::Value;

use crate::clock::{format_micros, micros_of, now_micros};
use crate::error::{Error, Result};

/// The most ticks `CatchUp::All` fires for one schedule at once; past it the rest are
/// skipped with a warning.
pub const MAX_CATCH_UP: usize = 1_000;

/// How late the latest tick may be and still fire with `CatchUp::None` (a busy foreman
/// or a short restart is not downtime): a minute, or one interval if that is shorter.
const ON_TIME: Duration = Duration::from_secs(60);

/// The shortest interval (`--every`).
pub const MIN_EVERY: Duration = Duration::from_millis(100);

/// When a schedule's ticks are: a cron expression or an interval.
#[derive(Debug, Clone)]
pub enum Cadence {
    /// A cron expression in a time zone.
    Cron {
        expr: String,
        zone_name: String,
        cron: Box<Cron>,
        zone: TimeZone,
    },
    /// Every so long, from the time the schedule was added.
    Every(Duration),
}

impl Cadence {
    /// A 5-field cron expression (or `@hourly`, `@daily`, `@weekly`, `@monthly`,
    /// `@yearly`) in `zone` (an IANA name; the system's zone when not given).
    pub fn cron(expr: &str, zone: Option<&str>) -> Result<Cadence> {
        let cron = CronParser::builder()
            .seconds(Seconds::Disallowed)
            .build()
            .parse(expr)
            .map_err(|e| {
                Error::bad_input(
                    "--cron",
                    format!(
                        "{expr:?} is not a cron expression ({e}); write 5 fields: minute hour \
                         day-of-month month day-of-week, e.g. \"*/5 * * * *\", or @hourly, @daily"
                    ),
                )
            })?;
        let (zone, zone_name) = match zone {
            Some(name) => (
                TimeZone::get(name).map_err(|e| {
                    Error::bad_input(
                        "--tz",
                        format!(
                            "{name:?} is not a time zone this machine knows ({e}); give an \
                             IANA name such as Europe/Berlin or UTC"
                        ),
                    )
                })?,
                name.to_owned(),
            ),
            None => {
                let system = TimeZone::system();
                let name = system.iana_name().unwrap_or("UTC").to_owned();
                (TimeZone::get(&name).unwrap_or(TimeZone::UTC), name)
            }
        };
        Ok(Cadence::Cron {
            expr: expr.to_owned(),
            zone_name,
            cron: Box::new(cron),
            zone,
        })
    }

    pub fn every(every: Duration) -> Result<Cadence> {
        if every < MIN_EVERY {
            return Err(Error::bad_input(
                "--every",
                format!(
                    "{} s is too short; give at least {} s",
                    every.as_secs_f64(),
                    MIN_EVERY.as_secs_f64()
                ),
            ));
        }
        Ok(Cadence::Every(every))
    }

    /// The first tick strictly after `t` (Unix µs); None if the expression never matches
    /// again.
    pub fn next_after(&self, t: i64) -> Option<i64> {
        match self {
            Cadence::Every(every) => Some(t.saturating_add(micros_of(*every))),
            Cadence::Cron { cron, zone, .. } => {
                let at = Timestamp::from_microsecond(t).ok()?.to_zoned(zone.clone());
                let next = cron.find_next_occurrence(&at, false).ok()?;
                Some(next.timestamp().as_microsecond())
            }
        }
    }

    /// How late the latest tick may be and still count as on time (`CatchUp::None`).
    fn on_time(&self) -> Duration {
        match self {
            Cadence::Every(every) => (*every).min(ON_TIME),
            Cadence::Cron { .. } => ON_TIME,
        }
    }

    /// `cron "*/5 * * * *" (Europe/Berlin)` or `every 30 s`.
    pub fn describe(&self) -> String {
        match self {
            Cadence::Cron {
                expr, zone_name, ..
            } => format!("cron {expr:?} ({zone_name})"),
            Cadence::Every(every) => format!("every {} s", every.as_secs_f64()),
        }
    }
}

/// What a schedule does about ticks that passed while no foreman ran.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum CatchUp {
    /// Skip them; fire the latest only if it is on time.
    None,
    /// Fire once for all of them.
    One,
    /// Fire each (at most `MAX_CATCH_UP`).
    All,
}

impl CatchUp {
    fn as_str(self) -> &'static str {
        match self {
            CatchUp::None => "none",
            CatchUp::One => "one",
            CatchUp::All => "all",
        }
    }

    fn parse(text: &str) -> CatchUp {
        match text {
            "none" => CatchUp::None,
            "all" => CatchUp::All,
            _ => CatchUp::One,
        }
    }
}

/// What to fire for a schedule whose next tick is `next_fire` at time `now`: the ticks
/// to fire (nominal times, oldest first), the new `next_fire` (after `now`), and how many
/// ticks were skipped.
pub fn ticks(when: &Cadence, catch_up: CatchUp, next_fire: i64, now: i64) -> Ticks {
    let mut passed = Vec::new();
    let mut skipped = 0u64;
    let mut tick = Some(next_fire);
    while let Some(t) = tick.filter(|t| *t <= now) {
        if passed.len() < MAX_CATCH_UP {
            passed.push(t);
        } else {
            // Only the latest is kept past the cap; the ones between are skipped.
            if let Some(last) = passed.last_mut() {
                *last = t;
            }
            skipped += 1;
        }
        tick = when.next_after(t);
        // An interval far behind: jump to the last tick before now rather than walk.
        if let (Cadence::Every(every), Some(next)) = (when, tick)
            && catch_up != CatchUp::All
            && next <= now
        {
            let step = micros_of(*every).max(1);
            let behind = (now - next) / step;
            skipped += behind as u64;
            tick = Some(next + behind * step);
        }
    }
    let next = tick;
    let fire = match catch_up {
        CatchUp::All => passed,
        CatchUp::One => {
            skipped += passed.len().saturating_sub(1) as u64;
            passed.last().map(|t| vec![*t]).unwrap_or_default()
        }
        CatchUp::None => {
            skipped += passed.len().saturating_sub(1) as u64;
            match passed.last() {
                Some(t) if now - t <= micros_of(when.on_time()) => vec![*t],
                Some(_) => {
                    skipped += 1;
                    Vec::new()
                }
                None => Vec::new(),
            }
        }
    };
    Ticks {
        fire,
        next,
        skipped,
    }
}

/// See `ticks`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ticks {
    pub fire: Vec<i64>,
    /// None: the expression never matches again.
    pub next: Option<i64>,
    pub skipped: u64,
}

/// A schedule as `add` and `update` take it.
#[derive(Debug, Clone)]
pub struct NewSchedule {
    pub name: String,
    pub when: Cadence,
    pub task: String,
    pub args: Value,
    pub kwargs: Value,
    pub catch_up: CatchUp,
    pub jitter: Duration,
}

/// A name of letters, digits, '_', '-' and '.', as monitors have.
pub fn check_name(name: &str) -> Result<()> {
    if !crate::config::is_plain_name(name) {
        return Err(Error::bad_input(
            "NAME",
            format!("{name:?}: a schedule's name is letters, digits, '_', '-' and '.'"),
        ));
    }
    Ok(())
}

fn when_columns(when: &Cadence) -> (Option<&str>, Option<&str>, Option<i64>) {
    match when {
        Cadence::Cron {
            expr, zone_name, ..
        } => (Some(expr.as_str()), Some(zone_name.as_str()), None),
        Cadence::Every(every) => (None, None, Some(micros_of(*every))),
    }
}

/// Adds a schedule; its first tick is the first after now. A name taken is refused.
pub fn add(conn: &Connection, s: &NewSchedule) -> Result<i64> {
    let (added, next) = write(
        conn,
        s,
        "INSERT INTO schedules (name, cron, tz, every_us, task_name, args, kwargs, catch_up, \
         jitter_us, next_fire, created_at, updated_at) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?11) ON CONFLICT (name) DO NOTHING",
        "adding the schedule",
    )?;
    if added == 0 {
        return Err(Error::bad_input(
            "NAME",
            format!(
                "a schedule named {:?} exists; change it with `snapq schedule update`",
                s.name
            ),
        ));
    }
    Ok(next)
}

/// Replaces a schedule's definition (its history stays); the next tick is computed anew
/// from now. Exit 1 if there is none of that name.
pub fn update(conn: &Connection, s: &NewSchedule) -> Result<i64> {
    let (changed, next) = write(
        conn,
        s,
        "UPDATE schedules SET cron = ?2, tz = ?3, every_us = ?4, task_name = ?5, args = ?6, \
         kwargs = ?7, catch_up = ?8, jitter_us = ?9, next_fire = ?10, updated_at = ?11 \
         WHERE name = ?1",
        "updating the schedule",
    )?;
    if changed == 0 {
        return Err(no_schedule(&s.name));
    }
    Ok(next)
}

/// Runs `sql` (`add`'s or `update`'s) with the schedule's columns as ?1 … ?11 and its
/// first tick after now; returns the rows changed and that tick.
fn write(
    conn: &Connection,
    s: &NewSchedule,
    sql: &str,
    what: &'static str,
) -> Result<(usize, i64)> {
    let now = now_micros();
    let next = s.when.next_after(now).ok_or_else(|| {
        Error::bad_input(
            "--cron",
            format!("{} never fires after now", s.when.describe()),
        )
    })?;
    let (cron, tz, every) = when_columns(&s.when);
    let changed = conn
        .execute(
            sql,
            params![
                s.name,
                cron,
                tz,
                every,
                s.task,
                s.args.to_string(),
                s.kwargs.to_string(),
                s.catch_up.as_str(),
                micros_of(s.jitter),
                next,
                now
            ],
        )
        .map_err(Error::sqlite(what))?;
    Ok((changed, next))
}

fn no_schedule(name: &str) -> Error {
    Error::NotThere(format!(
        "no schedule named {name:?}; `snapq schedule list` lists them"
    ))
}

pub fn remove(conn: &Connection, name: &str) -> Result<()> {
    let n = conn
        .execute("DELETE FROM schedules WHERE name = ?1", [name])
        .map_err(Error::sqlite("removing the schedule"))?;
    if n == 0 {
        return Err(no_schedule(name));
    }
    Ok(())
}

/// Pauses (no ticks fire) or resumes a schedule. Resuming starts from the next tick after
/// now: what passed while paused is not caught up.
pub fn set_paused(conn: &Connection, name: &str, paused: bool) -> Result<()> {
    let schedule = get(conn, name)?.ok_or_else(|| no_schedule(name))?;
    let now = now_micros();
    let next = if paused {
        schedule.next_fire_us
    } else {
        schedule
            .when
            .next_after(now)
            .unwrap_or(schedule.next_fire_us)
    };
    conn.execute(
        "UPDATE schedules SET paused = ?2, next_fire = ?3, updated_at = ?4 WHERE name = ?1",
        params![name, paused, next, now],
    )
    .map_err(Error::sqlite("pausing or resuming the schedule"))?;
    Ok(())
}

/// One schedule as stored, for `list`, `show` and the foreman.
#[derive(Debug, Clone)]
pub struct Stored {
    pub name: String,
    pub when: Cadence,
    pub task: String,
    pub args: String,
    pub kwargs: String,
    pub catch_up: CatchUp,
    pub jitter: Duration,
    pub paused: bool,
    pub next_fire_us: i64,
    pub last_fire_us: Option<i64>,
    pub last_task_id: Option<i64>,
}

const COLUMNS: &str = "name, cron, tz, every_us, task_name, args, kwargs, catch_up, jitter_us, \
                       paused, next_fire, last_fire, last_task_id, rowid";

/// A row another program wrote badly: its rowid and what is wrong with it.
type Unreadable = (i64, String);

/// A row as stored. A row another program wrote badly (a value of the wrong type, an
/// expression or zone that does not parse) comes back as `Unreadable`, naming the
/// schedule where it can.
fn stored(r: &rusqlite::Row) -> rusqlite::Result<std::result::Result<Stored, Unreadable>> {
    let rowid: i64 = r.get(13)?;
    let name = match r.get_ref(0)? {
        rusqlite::types::ValueRef::Text(t) => String::from_utf8_lossy(t).into_owned(),
        other => format!("{other:?}"),
    };
    let read = || -> std::result::Result<Stored, String> {
        let text = |e: rusqlite::Error| e.to_string();
        let cron: Option<String> = r.get(1).map_err(text)?;
        let tz: Option<String> = r.get(2).map_err(text)?;
        let every: Option<i64> = r.get(3).map_err(text)?;
        let when = match (cron, every) {
            (Some(expr), _) => Cadence::cron(&expr, tz.as_deref()).map_err(|e| e.to_string())?,
            (None, Some(us)) if us > 0 => Cadence::Every(Duration::from_micros(us as u64)),
            _ => return Err("neither a cron expression nor an interval".to_owned()),
        };
        Ok(Stored {
            name: name.clone(),
            when,
            task: r.get(4).map_err(text)?,
            args: r.get(5).map_err(text)?,
            kwargs: r.get(6).map_err(text)?,
            catch_up: CatchUp::parse(&r.get::<_, String>(7).map_err(text)?),
            jitter: Duration::from_micros(r.get::<_, i64>(8).map_err(text)?.max(0) as u64),
            paused: r.get(9).map_err(text)?,
            next_fire_us: r.get(10).map_err(text)?,
            last_fire_us: r.get(11).map_err(text)?,
            last_task_id: r.get(12).map_err(text)?,
        })
    };
    Ok(read().map_err(|e| (rowid, format!("schedule {name:?} cannot be read: {e}"))))
}

pub fn get(conn: &Connection, name: &str) -> Result<Option<Stored>> {
    let row = conn
        .query_row(
            &format!("SELECT {COLUMNS} FROM schedules WHERE name = ?1"),
            [name],
            stored,
        )
        .optional()
        .map_err(Error::sqlite("reading the schedule"))?;
    row.map(|r| r.map_err(|(_, e)| Error::Runtime(e)))
        .transpose()
}

pub fn list(conn: &Connection) -> Result<Vec<Stored>> {
    let mut stmt = conn
        .prepare(&format!("SELECT {COLUMNS} FROM schedules ORDER BY name"))
        .map_err(Error::sqlite("listing schedules"))?;
    let rows = stmt
        .query_map([], stored)
        .map_err(Error::sqlite("listing schedules"))?;
    let mut out = Vec::new();
    for row in rows {
        match row.map_err(Error::sqlite("listing schedules"))? {
            Ok(s) => out.push(s),
            Err((_, e)) => tracing::warn!("{e}"),
        }
    }
    Ok(out)
}

/// The earliest `next_fire` of the schedules that are not paused.
pub fn earliest(conn: &Connection) -> Result<Option<i64>> {
    conn.prepare_cached("SELECT min(next_fire) FROM schedules WHERE paused = 0")
        .and_then(|mut s| s.query_row([], |r| r.get(0)))
        .map_err(Error::sqlite("reading the next schedule"))
}

/// What one `fire_due` did.
#[derive(Debug, Default)]
pub struct Fired {
    /// (schedule, tick, task id) for each task enqueued.
    pub tasks: Vec<(String, i64, i64)>,
    /// (schedule, ticks skipped).
    pub skipped: Vec<(String, u64)>,
}

/// A schedule's tick as the task it enqueues.
#[derive(Debug, Clone)]
pub struct Tick {
    pub task: String,
    /// A JSON array, as text.
    pub args: String,
    /// A JSON object, as text.
    pub kwargs: String,
    /// When it fired (Unix µs): the task's enqueue time.
    pub created_at: i64,
    /// A later run time from the schedule's jitter.
    pub run_at: Option<i64>,
}

/// In one transaction: for every schedule due at `now`, enqueues its tick's task (a run
/// time delayed by a random part of its jitter) into the database's queue and moves its
/// `next_fire` past `now`.
pub fn fire_due(conn: &Connection, now: i64) -> Result<Fired> {
    fire_due_into(conn, now, into_database)
}

/// The database's queue, for `fire_due_into`: one row per tick, their ids.
pub fn into_database(conn: &Connection, ticks: &[Tick]) -> Result<Vec<i64>> {
    let mut insert = conn
        .prepare_cached(
            "INSERT INTO tasks (task_name, args, kwargs, created_at, run_at) \
             VALUES (?1, ?2, ?3, ?4, ?5)",
        )
        .map_err(Error::sqlite("enqueueing a schedule's task"))?;
    ticks
        .iter()
        .map(|t| {
            insert
                .insert(params![t.task, t.args, t.kwargs, t.created_at, t.run_at])
                .map_err(Error::sqlite("enqueueing a schedule's task"))
        })
        .collect()
}

/// Ticks as tasks for a queue backend's `enqueue` (a broker's): their arguments parsed
/// again (they were checked when the schedule was added or updated).
pub fn as_new_tasks(ticks: &[Tick]) -> Result<Vec<crate::queue::NewTask>> {
    ticks
        .iter()
        .map(|t| {
            let parse = |text: &str| {
                serde_json::from_str(text).map_err(|e| {
                    Error::Runtime(format!(
                        "a schedule of task {} holds arguments that are not JSON ({e}); \
                         mend it with `snapq schedule update`",
                        t.task
                    ))
                })
            };
            Ok(crate::queue::NewTask {
                task: t.task.clone(),
                args: parse(&t.args)?,
                kwargs: parse(&t.kwargs)?,
                when: t
                    .run_at
                    .map_or(crate::queue::When::Now, crate::queue::When::At),
            })
        })
        .collect()
}

/// `fire_due` with the ticks' tasks given to `put` (which returns their ids, in order):
/// inside the transaction that moves the schedules on, so ticks that could not be
/// enqueued leave their schedules as they were, due again.
pub fn fire_due_into(
    conn: &Connection,
    now: i64,
    put: impl FnOnce(&Connection, &[Tick]) -> Result<Vec<i64>>,
) -> Result<Fired> {
    crate::db::immediate(conn, "firing schedules", || {
        let due: Vec<_> = {
            let mut stmt = conn
                .prepare_cached(&format!(
                    "SELECT {COLUMNS} FROM schedules WHERE paused = 0 AND next_fire <= ?1"
                ))
                .map_err(Error::sqlite("reading due schedules"))?;
            let rows = stmt
                .query_map([now], stored)
                .map_err(Error::sqlite("reading due schedules"))?;
            rows.collect::<rusqlite::Result<Vec<_>>>()
                .map_err(Error::sqlite("reading due schedules"))?
        };
        let mut fired = Fired::default();
        // Per schedule: its name, its next fire and its ticks (schedule, tick time).
        let mut moves: Vec<(String, Option<i64>)> = Vec::new();
        let mut fired_ticks: Vec<(String, i64)> = Vec::new();
        let mut tasks: Vec<Tick> = Vec::new();
        for schedule in due {
            let s = match schedule {
                Ok(s) => s,
                Err((rowid, e)) => {
                    // Paused, or it would be due again at once, every turn of the loop.
                    tracing::error!(
                        "{e}; paused. Mend it with `snapq schedule update` (or remove it), \
                         then `snapq schedule resume`"
                    );
                    conn.execute("UPDATE schedules SET paused = 1 WHERE rowid = ?1", [rowid])
                        .map_err(Error::sqlite("pausing an unreadable schedule"))?;
                    continue;
                }
            };
            let ticks = ticks(&s.when, s.catch_up, s.next_fire_us, now);
            for tick in &ticks.fire {
                let run_at = match s.jitter {
                    Duration::ZERO => None,
                    jitter => Some(now + fastrand::i64(0..=micros_of(jitter))),
                };
                tasks.push(Tick {
                    task: s.task.clone(),
                    args: s.args.clone(),
                    kwargs: s.kwargs.clone(),
                    created_at: now,
                    run_at,
                });
                fired_ticks.push((s.name.clone(), *tick));
            }
            if ticks.skipped > 0 {
                fired.skipped.push((s.name.clone(), ticks.skipped));
            }
            moves.push((s.name, ticks.next));
        }
        let ids = if tasks.is_empty() {
            Vec::new()
        } else {
            put(conn, &tasks)?
        };
        fired.tasks = fired_ticks
            .into_iter()
            .zip(ids)
            .map(|((name, tick), id)| (name, tick, id))
            .collect();
        for (name, next) in moves {
            let last = fired
                .tasks
                .iter()
                .rev()
                .find(|(fired_name, ..)| *fired_name == name)
                .map(|(_, tick, id)| (*tick, *id));
            // A cron expression that never matches again is paused where it stands.
            conn.prepare_cached(
                "UPDATE schedules SET next_fire = coalesce(?2, next_fire), \
                 paused = paused OR ?2 IS NULL, \
                 last_fire = coalesce(?3, last_fire), last_task_id = coalesce(?4, last_task_id) \
                 WHERE name = ?1",
            )
            .and_then(|mut u| u.execute(params![name, next, last.map(|l| l.0), last.map(|l| l.1)]))
            .map_err(Error::sqlite("moving a schedule on"))?;
        }
        Ok(fired)
    })
}

/// Schedules for `status`: how many, how many paused, the next tick and the last fire
/// (with the state of the task it enqueued).
#[derive(Debug, Clone, Default, Serialize)]
pub struct Counts {
    pub total: i64,
    pub paused: i64,
    /// The schedule whose tick is next, and when.
    pub next: Option<(String, String)>,
    /// The schedule that fired last, when, and its task's state.
    pub last: Option<LastFire>,
}

#[derive(Debug, Clone, Serialize)]
pub struct LastFire {
    pub schedule: String,
    pub at: String,
    pub task_id: Option<i64>,
    pub state: Option<String>,
}

pub fn counts(conn: &Connection) -> Result<Counts> {
    let (total, paused) = conn
        .query_row(
            "SELECT count(*), coalesce(sum(paused), 0) FROM schedules",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .map_err(Error::sqlite("counting schedules"))?;
    let next = conn
        .query_row(
            "SELECT name, next_fire FROM schedules WHERE paused = 0 ORDER BY next_fire LIMIT 1",
            [],
            |r| Ok((r.get::<_, String>(0)?, format_micros(r.get(1)?))),
        )
        .optional()
        .map_err(Error::sqlite("reading the next schedule"))?;
    let last = conn
        .query_row(
            "SELECT name, last_fire, last_task_id FROM schedules WHERE last_fire IS NOT NULL \
             ORDER BY last_fire DESC LIMIT 1",
            [],
            |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, i64>(1)?,
                    r.get::<_, Option<i64>>(2)?,
                ))
            },
        )
        .optional()
        .map_err(Error::sqlite("reading the last fired schedule"))?;
    let last = match last {
        Some((schedule, at, task_id)) => Some(LastFire {
            state: match task_id {
                Some(id) => crate::records::show(conn, id)?.map(|r| r.state),
                None => None,
            },
            schedule,
            at: format_micros(at),
            task_id,
        }),
        None => None,
    };
    Ok(Counts {
        total,
        paused,
        next,
        last,
    })
}

/// One schedule as `schedule list --json` and `status` print it.
#[derive(Debug, Clone, Serialize)]
pub struct Shown {
    pub name: String,
    pub when: String,
    pub task: String,
    pub args: Value,
    pub kwargs: Value,
    pub catch_up: CatchUp,
    pub jitter_seconds: f64,
    pub paused: bool,
    pub next_fire_at: Option<String>,
    pub last_fire_at: Option<String>,
    pub last_task_id: Option<i64>,
    /// The state of the last task it enqueued (from the queue or its record).
    pub last_task_state: Option<String>,
    /// The next five ticks (`schedule show`).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub upcoming: Vec<String>,
}

impl Shown {
    pub fn of(conn: &Connection, s: &Stored, upcoming: usize) -> Result<Shown> {
        let json = |text: &str| serde_json::from_str(text).unwrap_or(Value::String(text.into()));
        let last_task_state = match s.last_task_id {
            Some(id) => crate::records::show(conn, id)?.map(|r| r.state),
            None => None,
        };
        let mut ticks = Vec::new();
        let mut t = Some(s.next_fire_us);
        while let Some(tick) = t.filter(|_| ticks.len() < upcoming) {
            ticks.push(format_micros(tick));
            t = s.when.next_after(tick);
        }
        Ok(Shown {
            name: s.name.clone(),
            when: s.when.describe(),
            task: s.task.clone(),
            args: json(&s.args),
            kwargs: json(&s.kwargs),
            catch_up: s.catch_up,
            jitter_seconds: s.jitter.as_secs_f64(),
            paused: s.paused,
            next_fire_at: (!s.paused).then(|| format_micros(s.next_fire_us)),
            last_fire_at: s.last_fire_us.map(format_micros),
            last_task_id: s.last_task_id,
            last_task_state,
            upcoming: ticks,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use jiff::civil::date;

    fn at(zone: &str, y: i16, m: i8, d: i8, h: i8, min: i8) -> i64 {
        date(y, m, d)
            .at(h, min, 0, 0)
            .in_tz(zone)
            .unwrap()
            .timestamp()
            .as_microsecond()
    }

    fn local(zone: &str, t: i64) -> String {
        Timestamp::from_microsecond(t)
            .unwrap()
            .to_zoned(TimeZone::get(zone).unwrap())
            .strftime("%Y-%m-%d %H:%M %Z")
            .to_string()
    }

    fn walk(when: &Cadence, from: i64, n: usize) -> Vec<i64> {
        let mut out = Vec::new();
        let mut t = from;
        for _ in 0..n {
            t = when.next_after(t).unwrap();
            out.push(t);
        }
        out
    }

    #[test]
    fn cron_ticks_across_a_month() {
        let when = Cadence::cron("30 9 * * 1-5", Some("UTC")).unwrap();
        // Thursday 2026-01-01 00:00 UTC; weekdays at 09:30 in January: 22 of them.
        let ticks = walk(&when, at("UTC", 2026, 1, 1, 0, 0), 23);
        let january: Vec<_> = ticks
            .iter()
            .filter(|t| **t < at("UTC", 2026, 2, 1, 0, 0))
            .collect();
        assert_eq!(january.len(), 22);
        assert_eq!(local("UTC", ticks[0]), "2026-01-01 09:30 UTC");
        assert_eq!(local("UTC", ticks[1]), "2026-01-02 09:30 UTC");
        // Then Monday the 5th: the weekend is skipped.
        assert_eq!(local("UTC", ticks[2]), "2026-01-05 09:30 UTC");
        assert_eq!(local("UTC", ticks[22]), "2026-02-02 09:30 UTC");
        let hourly = Cadence::cron("@hourly", Some("UTC")).unwrap();
        assert_eq!(
            walk(&hourly, at("UTC", 2026, 1, 31, 22, 10), 3)
                .into_iter()
                .map(|t| local("UTC", t))
                .collect::<Vec<_>>(),
            [
                "2026-01-31 23:00 UTC",
                "2026-02-01 00:00 UTC",
                "2026-02-01 01:00 UTC"
            ]
        );
    }

    #[test]
    fn daylight_saving_changes_in_berlin_and_new_york() {
        // (zone, spring-forward day, its expected two ticks of "30 2 * * *", fall-back
        // day, the expression for a time in its repeated hour, its expected two ticks)
        for (zone, spring, spring_ticks, autumn, repeated, autumn_ticks) in [
            (
                "Europe/Berlin",
                (2026, 3, 29),
                ["2026-03-29 03:00 CEST", "2026-03-30 02:30 CEST"],
                (2026, 10, 25),
                "30 2 * * *",
                ["2026-10-25 02:30 CEST", "2026-10-26 02:30 CET"],
            ),
            (
                "America/New_York",
                (2026, 3, 8),
                ["2026-03-08 03:00 EDT", "2026-03-09 02:30 EDT"],
                (2026, 11, 1),
                "30 1 * * *",
                ["2026-11-01 01:30 EDT", "2026-11-02 01:30 EST"],
            ),
        ] {
            // 02:30 does not exist on the spring-forward day: it fires once, at the first
            // valid minute after the gap.
            let daily = Cadence::cron("30 2 * * *", Some(zone)).unwrap();
            let (y, m, d) = spring;
            let shown: Vec<String> = walk(&daily, at(zone, y, m, d - 1, 12, 0), 2)
                .into_iter()
                .map(|t| local(zone, t))
                .collect();
            assert_eq!(shown, spring_ticks, "{zone}");
            // A time in the repeated hour fires once, at its first occurrence.
            let (y, m, d) = autumn;
            let daily = Cadence::cron(repeated, Some(zone)).unwrap();
            let shown: Vec<String> = walk(&daily, at(zone, y, m, d, 0, 0), 2)
                .into_iter()
                .map(|t| local(zone, t))
                .collect();
            assert_eq!(shown, autumn_ticks, "{zone}");
        }
    }

    #[test]
    fn catch_up_after_three_hours_down() {
        let when = Cadence::every(Duration::from_secs(600)).unwrap();
        let next = at("UTC", 2026, 1, 1, 0, 10);
        let now = at("UTC", 2026, 1, 1, 3, 5);
        // Ticks at 00:10, 00:20, …, 03:00: 18 of them passed.
        let all = ticks(&when, CatchUp::All, next, now);
        assert_eq!(all.fire.len(), 18);
        assert_eq!(all.fire[0], next);
        assert_eq!(all.next, Some(at("UTC", 2026, 1, 1, 3, 10)));
        let one = ticks(&when, CatchUp::One, next, now);
        assert_eq!(one.fire, [at("UTC", 2026, 1, 1, 3, 0)]);
        assert_eq!((one.skipped, one.next), (17, all.next));
        // `none`: 03:00 is 5 minutes late, more than the minute a tick may be late and
        // count as on time: nothing fires, all 18 are skipped.
        let none = ticks(&when, CatchUp::None, next, now);
        assert!(none.fire.is_empty());
        assert_eq!((none.skipped, none.next), (18, all.next));
        // Back 30 s after 03:00, `none` fires 03:00 and skips the 17 before it.
        let back = at("UTC", 2026, 1, 1, 3, 0) + 30_000_000;
        let none = ticks(&when, CatchUp::None, next, back);
        assert_eq!(none.fire, [at("UTC", 2026, 1, 1, 3, 0)]);
        assert_eq!(none.skipped, 17);
        // An hourly cron schedule back at 03:59: 01:00, 02:00 and 03:00 are all missed.
        let hourly = Cadence::cron("0 * * * *", Some("UTC")).unwrap();
        let late = ticks(
            &hourly,
            CatchUp::None,
            at("UTC", 2026, 1, 1, 1, 0),
            at("UTC", 2026, 1, 1, 3, 59),
        );
        assert!(late.fire.is_empty());
        assert_eq!(late.skipped, 3);
        assert_eq!(late.next, Some(at("UTC", 2026, 1, 1, 4, 0)));
        // Nothing due: nothing fires, nothing moves.
        let early = ticks(&when, CatchUp::One, now + 1, now);
        assert_eq!(
            early,
            Ticks {
                fire: vec![],
                next: Some(now + 1),
                skipped: 0
            }
        );
        // `all` is bounded.
        let second = Cadence::every(Duration::from_secs(1)).unwrap();
        let capped = ticks(&second, CatchUp::All, next, next + 3_600_000_000);
        assert_eq!(capped.fire.len(), MAX_CATCH_UP);
        assert_eq!(capped.skipped, 3_601 - MAX_CATCH_UP as u64);
    }

    #[test]
    fn a_fire_enqueues_in_the_transaction_that_moves_the_schedule_and_jitter_delays_it() {
        let dir = tempfile::tempdir().unwrap();
        let conn = crate::db::open(
            &dir.path().join("q.sqlite3"),
            crate::db::Synchronous::Normal,
        )
        .unwrap();
        let new = NewSchedule {
            name: "j".into(),
            when: Cadence::every(Duration::from_secs(1)).unwrap(),
            task: "noop".into(),
            args: serde_json::json!([]),
            kwargs: serde_json::json!({}),
            catch_up: CatchUp::One,
            jitter: Duration::from_secs(10),
        };
        let first = add(&conn, &new).unwrap();
        assert!(fire_due(&conn, first - 1).unwrap().tasks.is_empty());
        let fired = fire_due(&conn, first).unwrap();
        assert_eq!(fired.tasks.len(), 1);
        let (_, tick, id) = fired.tasks[0].clone();
        assert_eq!(tick, first);
        let run_at: i64 = conn
            .query_row("SELECT run_at FROM tasks WHERE id = ?1", [id], |r| r.get(0))
            .unwrap();
        assert!((first..=first + 10_000_000).contains(&run_at), "{run_at}");
        let stored = get(&conn, "j").unwrap().unwrap();
        assert_eq!(stored.next_fire_us, first + 1_000_000);
        assert_eq!(stored.last_task_id, Some(id));
        // The same instant again: the tick is not fired twice.
        assert!(fire_due(&conn, first).unwrap().tasks.is_empty());
    }

    #[test]
    fn a_row_another_program_wrote_badly_is_paused_and_the_others_fire() {
        let dir = tempfile::tempdir().unwrap();
        let conn = crate::db::open(
            &dir.path().join("q.sqlite3"),
            crate::db::Synchronous::Normal,
        )
        .unwrap();
        for (name, cron, args) in [
            ("bad-cron", "'not cron'", "'[]'"),
            ("bad-args", "'* * * * *'", "X'FF00'"),
            ("good", "'* * * * *'", "'[]'"),
        ] {
            conn.execute_batch(&format!(
                "INSERT INTO schedules (name, cron, tz, task_name, args, next_fire, created_at, \
                 updated_at) VALUES ('{name}', {cron}, 'UTC', 'noop', {args}, 0, 0, 0)"
            ))
            .unwrap();
        }
        let fired = fire_due(&conn, 1_000_000).unwrap();
        assert_eq!(fired.tasks.len(), 1);
        assert_eq!(fired.tasks[0].0, "good");
        let paused: Vec<String> = conn
            .prepare("SELECT name FROM schedules WHERE paused = 1 ORDER BY name")
            .unwrap()
            .query_map([], |r| r.get(0))
            .unwrap()
            .collect::<rusqlite::Result<_>>()
            .unwrap();
        assert_eq!(paused, ["bad-args", "bad-cron"]);
        // Nothing is due again at once: the loop does not spin on them.
        assert!(earliest(&conn).unwrap().unwrap() > 1_000_000);
    }

    #[test]
    fn bad_expressions_and_zones_are_refused() {
        for expr in ["* * * *", "61 * * * *", "* * * * * *", "@sometimes", ""] {
            assert!(Cadence::cron(expr, Some("UTC")).is_err(), "{expr}");
        }
        let err = Cadence::cron("* * * * *", Some("Mars/Olympus"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("Mars/Olympus"), "{err}");
        assert!(Cadence::every(Duration::ZERO).is_err());
    }
}
