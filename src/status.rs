//! `snapq status`: what the queue holds and whether a foreman is alive, read from the
//! database (the foremen's heartbeat rows) without talking to any foreman.

use std::path::Path;

use rusqlite::Connection;
use serde::Serialize;

use crate::clock::{format_micros, now_micros};
use crate::error::{Error, Result};
use crate::pidfile::{is_snapq_foreman, process_exists};
use crate::queue;

/// A heartbeat older than this means the foreman is gone (it beats every second).
pub const STALE_AFTER_MICROS: i64 = 3_000_000;

#[derive(Debug, Clone, Serialize)]
pub struct Status {
    pub db: String,
    /// False when there is no database file at `db` (nothing was ever enqueued there).
    pub db_exists: bool,
    pub foreman: Option<ForemanStatus>,
    /// Every live foreman on this database (normally one).
    pub foremen: Vec<ForemanStatus>,
    pub tasks: TaskStatus,
    pub monitors: crate::monitor::store::Counts,
    /// Schedules: how many, paused, the next tick, the last fire and its task's state.
    pub schedules: crate::schedules::Counts,
    /// Where monitor results go: the results file, or RabbitMQ with its connection state
    /// and outbox.
    pub sink: Option<crate::outbox::SinkStatus>,
    /// PANIC's configurations consumed over RabbitMQ (`run --panic-configs`): the queue,
    /// the connection state, messages received, applied and rejected as malformed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub panic_configs: Option<crate::panic_configs::ConfigsStatus>,
    /// The task queue, when it is not the database (`--queue amqp://…`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub queue: Option<QueueStatus>,
}

/// A task queue other than the database: which, and whether its counts are exact.
#[derive(Debug, Clone, Serialize)]
pub struct QueueStatus {
    pub backend: &'static str,
    pub name: String,
    /// Without its password.
    pub url: String,
    /// The broker counts what waits in it, not what its consumers hold: `tasks.due` and
    /// `tasks.delayed` are "at least".
    pub counts_are_at_least: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct ForemanStatus {
    pub alive: bool,
    /// "running", or "stopping" after a stop signal (waiting for its running tasks).
    pub state: &'static str,
    /// While stopping: when it exits whatever still runs.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stop_deadline: Option<String>,
    pub pid: i64,
    pub started_at: String,
    pub uptime_seconds: f64,
    pub last_beat_age_seconds: f64,
    pub workers: i64,
    pub running: i64,
}

#[derive(Debug, Clone, Serialize)]
pub struct TaskStatus {
    /// Tasks that ended badly in the last hour, from their records.
    pub last_hour: crate::records::Trouble,
    pub due: i64,
    pub delayed: i64,
    /// Of the due and delayed tasks, those waiting for their next attempt (retries).
    pub retrying: i64,
    pub running: i64,
    pub oldest_due_age_seconds: Option<f64>,
    pub next_delayed_in_seconds: Option<f64>,
}

pub fn read(conn: &Connection, db_path: &Path) -> Result<Status> {
    let now = now_micros();
    let counts = queue::counts(conn, now)?;
    let mut stmt = conn
        .prepare(
            "SELECT pid, started_at, beat_at, workers, running, stop_deadline FROM foremen \
             ORDER BY started_at",
        )
        .map_err(Error::sqlite("reading foremen"))?;
    let rows = stmt
        .query_map([], |r| {
            Ok((
                r.get::<_, i64>(0)?,
                r.get::<_, i64>(1)?,
                r.get::<_, i64>(2)?,
                r.get::<_, i64>(3)?,
                r.get::<_, i64>(4)?,
                r.get::<_, Option<i64>>(5)?,
            ))
        })
        .map_err(Error::sqlite("reading foremen"))?;
    let mut foremen = Vec::new();
    for row in rows {
        let (pid, started_at, beat_at, workers, running, stop_deadline) =
            row.map_err(Error::sqlite("reading foremen"))?;
        // A late heartbeat with the process still there is a foreman whose database is
        // busy (its heartbeat write waits for the lock; invariant 11), not a dead one: it
        // counts as alive if that pid is a snapq process other than this one.
        let fresh = now - beat_at < STALE_AFTER_MICROS;
        let alive = i32::try_from(pid).is_ok_and(|pid| {
            if fresh {
                process_exists(pid)
            } else {
                pid as u32 != std::process::id() && is_snapq_foreman(pid)
            }
        });
        if alive {
            foremen.push(ForemanStatus {
                alive,
                state: if stop_deadline.is_some() {
                    "stopping"
                } else {
                    "running"
                },
                stop_deadline: stop_deadline.map(format_micros),
                pid,
                started_at: format_micros(started_at),
                uptime_seconds: seconds(now - started_at),
                last_beat_age_seconds: seconds(now - beat_at),
                workers,
                running,
            });
        }
    }
    Ok(Status {
        db: db_path.display().to_string(),
        db_exists: true,
        foreman: foremen.first().cloned(),
        tasks: TaskStatus {
            last_hour: crate::records::trouble_since(conn, now - 3_600_000_000)?,
            due: counts.due,
            delayed: counts.delayed,
            retrying: queue::count_retrying(conn)?,
            running: foremen.iter().map(|f| f.running).sum(),
            oldest_due_age_seconds: counts.oldest_due.map(|t| seconds(now - t)),
            next_delayed_in_seconds: counts.next_delayed.map(|t| seconds(t - now)),
        },
        foremen,
        monitors: crate::monitor::store::counts(conn)?,
        schedules: crate::schedules::counts(conn)?,
        sink: Some(crate::outbox::status(conn)?),
        panic_configs: crate::panic_configs::status(conn)?,
        queue: None,
    })
}

/// The status of a home where nothing was ever enqueued (no database file yet).
pub fn empty(db_path: &Path) -> Status {
    Status {
        db: db_path.display().to_string(),
        db_exists: false,
        foreman: None,
        foremen: Vec::new(),
        tasks: TaskStatus {
            last_hour: Default::default(),
            due: 0,
            delayed: 0,
            retrying: 0,
            running: 0,
            oldest_due_age_seconds: None,
            next_delayed_in_seconds: None,
        },
        monitors: Default::default(),
        schedules: Default::default(),
        sink: None,
        panic_configs: None,
        queue: None,
    }
}

/// A duration for people: `0.183 s`, `42.0 s`, `17 min`, `5.2 h`, `2527 days` (not
/// `218332215.961 s`). `--json` keeps the plain seconds.
fn human(seconds: f64) -> String {
    match seconds {
        s if s < 10.0 => format!("{s:.3} s"),
        s if s < 120.0 => format!("{s:.1} s"),
        s if s < 7_200.0 => format!("{:.0} min", s / 60.0),
        s if s < 172_800.0 => format!("{:.1} h", s / 3_600.0),
        s => format!("{:.0} days", s / 86_400.0),
    }
}

fn seconds(micros: i64) -> f64 {
    micros.max(0) as f64 / 1e6
}

impl Status {
    /// The text `snapq status` prints.
    pub fn render(&self) -> String {
        let mut out = String::new();
        match &self.foreman {
            Some(f) => {
                out.push_str(&format!(
                    "foreman: {} (pid {}, {} workers, up {}, last heartbeat {} ago)\n",
                    f.state,
                    f.pid,
                    f.workers,
                    human(f.uptime_seconds),
                    human(f.last_beat_age_seconds)
                ));
                if let Some(deadline) = &f.stop_deadline {
                    out.push_str(&format!(
                        "  stopping: no new task starts; it waits for the {} running until {deadline}\n",
                        f.running
                    ));
                }
                if f.last_beat_age_seconds * 1e6 >= STALE_AFTER_MICROS as f64 {
                    out.push_str(
                        "  its heartbeat is late: the database is busy (another process holds \
                         its write lock) or the foreman is stuck\n",
                    );
                }
            }
            None => out.push_str("foreman: not running (start it with `snapq run`)\n"),
        }
        for other in self.foremen.iter().skip(1) {
            out.push_str(&format!("also running: pid {}\n", other.pid));
        }
        let t = &self.tasks;
        let at_least = match &self.queue {
            Some(q) => {
                out.push_str(&format!("queue: {} {} at {}\n", q.backend, q.name, q.url));
                if q.counts_are_at_least {
                    "at least "
                } else {
                    ""
                }
            }
            None => "",
        };
        out.push_str(&format!("tasks due: {at_least}{}\n", t.due));
        out.push_str(&format!("tasks delayed: {at_least}{}", t.delayed));
        if let Some(next) = t.next_delayed_in_seconds {
            out.push_str(&format!(" (next due in {})", human(next)));
        }
        out.push('\n');
        if t.retrying > 0 {
            out.push_str(&format!(
                "tasks waiting to retry: {} (of the due and delayed)\n",
                t.retrying
            ));
        }
        out.push_str(&format!("tasks running: {}\n", t.running));
        let trouble = t.last_hour;
        out.push_str(&format!(
            "last hour: {} failed, {} lost, {} abandoned, {} dead{}\n",
            trouble.failed,
            trouble.lost,
            trouble.abandoned,
            trouble.dead,
            if trouble == Default::default() {
                ""
            } else {
                " (see `snapq history --since 1h`)"
            }
        ));
        match t.oldest_due_age_seconds {
            Some(age) => out.push_str(&format!("oldest due task: due {} ago\n", human(age))),
            None => out.push_str("oldest due task: none\n"),
        }
        let m = &self.monitors;
        out.push_str(&format!(
            "monitors: {} ({} enabled, {} failing; see `snapq monitor list`)\n",
            m.total, m.enabled, m.failing
        ));
        let s = &self.schedules;
        if s.total > 0 {
            out.push_str(&format!(
                "schedules: {} ({} paused){}{}; see `snapq schedule list`\n",
                s.total,
                s.paused,
                s.next
                    .as_ref()
                    .map(|(name, at)| format!("; next {name} at {at}"))
                    .unwrap_or_default(),
                s.last
                    .as_ref()
                    .map(|l| format!(
                        "; last {} at {} (task {}: {})",
                        l.schedule,
                        l.at,
                        l.task_id.map_or("?".into(), |id| id.to_string()),
                        l.state.as_deref().unwrap_or("pruned")
                    ))
                    .unwrap_or_default()
            ));
        }
        if let Some(sink) = &self.sink {
            match &sink.state {
                Some(state) => out.push_str(&format!(
                    "results: {}, {state} ({}); outbox {} unsent{}{}\n",
                    sink.broker.as_deref().unwrap_or(&sink.kind),
                    sink.detail.as_deref().unwrap_or(""),
                    sink.outbox_depth,
                    sink.oldest_unsent_age_seconds
                        .map(|a| format!(", oldest {a:.1} s"))
                        .unwrap_or_default(),
                    if sink.dropped > 0 {
                        format!(", {} dropped at the cap", sink.dropped)
                    } else {
                        String::new()
                    }
                )),
                None => out.push_str("results: results.jsonl in the home directory\n"),
            }
        }
        if let Some(p) = &self.panic_configs {
            out.push_str(&format!(
                "PANIC configs: queue {}, {} ({}); {} received, {} applied, {} rejected{}\n",
                p.queue,
                p.state,
                p.detail,
                p.received,
                p.applied,
                p.rejected,
                p.last_rejection
                    .as_deref()
                    .map(|r| format!(" (last: {r})"))
                    .unwrap_or_default()
            ));
        }
        out.push_str(&format!("database: {}\n", self.db));
        if !self.db_exists {
            out.push_str(
                "  it does not exist: nothing was ever enqueued here and no foreman ran here. \
                 Is --home (SNAPQ_HOME) or --db the one your foreman uses?\n",
            );
        }
        out
    }
}
