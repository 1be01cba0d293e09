//! The SQLite backend: the queue is the `tasks` table of the home's database, the wake-up
//! is inotify on the wake-up directory (src/wakeup.rs), and a task's record lives in the
//! same file, written in the claim's own transaction (src/records.rs).
//!
//! A claim is one `BEGIN IMMEDIATE` transaction: the ends settled since the last claim,
//! the `DELETE … RETURNING` of the due rows (src/queue.rs), and their records. An
//! at-least-once lease is the record itself (`max_attempts` set, naming this foreman):
//! nothing else needs writing, so both modes claim at the same cost.

use std::path::Path;
use std::time::Duration;

use crossbeam_channel::Receiver;
use rusqlite::{Connection, params};

use super::{Capabilities, Lease, QueueBackend};
use crate::clock::now_micros;
use crate::db::{self, Synchronous};
use crate::error::{Error, Result};
use crate::queue::{self, Counts, Cursor, NewTask, Row};
use crate::records::{self, Cancelled, Claimer, Finish, Orphan, Record};
use crate::registry::RetryPolicy;
use crate::wakeup::{WakeDir, Watch};

/// The page cache of the consumer's connection, in SQLite's unit (negative: KiB). Claims
/// touch only the front of one index and the table, a few pages; the default 2 MiB filled
/// up during a 50,000-task drain and was a third of the process's RSS (BENCHMARKS.md).
pub const CONSUMER_CACHE_SIZE: i64 = -256;

pub struct SqliteQueue {
    /// Commits with the user's `--synchronous`. Only the foreman loop uses a consumer
    /// (invariant 8).
    conn: Connection,
    /// Where `enqueue` pokes the consumers.
    wake: WakeDir,
    /// The inotify watch on the wake-up directory: `None` for a handle that only enqueues.
    watch: Option<Watch>,
    wake_rx: Receiver<()>,
    /// This process, as the records it writes name their foreman.
    claimer: Claimer,
    /// Ends settled and not yet written: written with the next claim, or by `flush`
    /// (invariant 9: never a transaction per task).
    finished: Vec<Finish>,
    /// Whether the next short claim also takes rows whose due time is not a number
    /// (`queue::claim_undated`).
    sweep_undated: bool,
    /// Where the next claim's walk of the rows due now starts; moved only by a claim
    /// transaction that committed.
    cursor: Cursor,
}

impl SqliteQueue {
    /// The foreman's handle: opens the database, starts watching the wake-up directory,
    /// then clears the wake files left from before (invariant 5: watching first, so no
    /// wake-up falls between).
    pub fn consumer(db: &Path, wakeup_dir: &Path, synchronous: Synchronous) -> Result<SqliteQueue> {
        let conn = db::open(db, synchronous)?;
        db::set_and_verify(&conn, "cache_size", CONSUMER_CACHE_SIZE)?;
        let (watch, wake_rx) = Watch::start(wakeup_dir)?;
        watch.clear_backlog()?;
        Ok(SqliteQueue {
            conn,
            wake: WakeDir::prepare(wakeup_dir)?,
            watch: Some(watch),
            wake_rx,
            claimer: Claimer::this_process(),
            finished: Vec::new(),
            sweep_undated: true,
            cursor: Cursor::default(),
        })
    }

    /// A handle that enqueues (and reads): no watch, its `wake_ups` never fire.
    pub fn producer(db: &Path, wakeup_dir: &Path, synchronous: Synchronous) -> Result<SqliteQueue> {
        let wake = WakeDir::prepare(wakeup_dir)?;
        Ok(SqliteQueue {
            conn: db::open(db, synchronous)?,
            wake,
            watch: None,
            wake_rx: crossbeam_channel::never(),
            claimer: Claimer::this_process(),
            finished: Vec::new(),
            sweep_undated: true,
            cursor: Cursor::default(),
        })
    }
}

impl QueueBackend for SqliteQueue {
    fn name(&self) -> &'static str {
        "sqlite"
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            cancel_by_id: true,
            exact_counts: true,
            delay_resolution: Duration::from_micros(1),
            priorities: false,
            due_order: true,
            shows_queued: true,
            claims_wait_for_round_trip: false,
        }
    }

    /// A write waits at most `db::LOOP_BUSY_TIMEOUT` for a lock another process holds.
    fn started(&mut self) -> Result<()> {
        db::wait_briefly_when_busy(&mut self.conn)
    }

    fn enqueue(&mut self, tasks: &[NewTask]) -> Result<Vec<i64>> {
        let now = now_micros();
        let rows = tasks
            .iter()
            .map(|t| Row::of(t, now))
            .collect::<Result<Vec<_>>>()?;
        Ok(queue::store(&mut self.conn, &self.wake, &rows, now)?
            .map(|ids| ids.collect())
            .unwrap_or_default())
    }

    fn claim(
        &mut self,
        limit: usize,
        policy: &dyn Fn(&str) -> Option<RetryPolicy>,
    ) -> Result<Vec<Lease>> {
        let mut sweep = self.sweep_undated;
        let mut cursor = self.cursor;
        // One transaction: the ends settled since, the claim, the claimed tasks' records
        // (invariants 1, 9 and 10).
        let claimed = records::claim(
            &self.conn,
            &mut self.finished,
            &self.claimer,
            |name| policy(name).map(|p| p.max_attempts()),
            |conn| {
                let mut claimed = queue::claim(conn, now_micros(), limit, &mut cursor)?;
                if sweep && claimed.len() < limit {
                    let room = limit - claimed.len();
                    let undated = queue::claim_undated(conn, room)?;
                    // A full sweep may have left more: sweep again on the next short claim.
                    sweep = undated.len() == room;
                    claimed.extend(undated);
                }
                Ok(claimed)
            },
        )?;
        self.sweep_undated = sweep;
        self.cursor = cursor;
        Ok(claimed
            .into_iter()
            .map(|task| Lease {
                retry: policy(&task.task_name),
                task,
            })
            .collect())
    }

    fn settle(&mut self, end: Finish) {
        self.finished.push(end);
    }

    fn unsettled(&self) -> usize {
        self.finished.len()
    }

    fn flush(&mut self) -> Result<Option<i64>> {
        records::settle(&self.conn, &mut self.finished)
    }

    fn release(&mut self, leases: Vec<Lease>) -> Result<()> {
        if leases.is_empty() {
            return Ok(());
        }
        db::immediate(&self.conn, "releasing unstarted tasks", || {
            for Lease { task, .. } in &leases {
                self.conn
                    .prepare_cached(
                        "INSERT OR IGNORE INTO tasks \
                         (id, task_name, args, kwargs, created_at, run_at, attempt) \
                         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                    )
                    .and_then(|mut s| {
                        s.execute(params![
                            task.id,
                            task.task_name,
                            task.args,
                            task.kwargs,
                            task.created_at,
                            task.due,
                            task.attempt
                        ])
                    })
                    .map_err(Error::sqlite("putting a task back in the queue"))?;
                // A first attempt had no record before its claim; a later one waited as
                // `queued`, and does again.
                self.conn
                    .prepare_cached(
                        "DELETE FROM task_records WHERE id = ?1 AND state = 'running' \
                         AND attempt = 1",
                    )
                    .and_then(|mut s| s.execute([task.id]))
                    .map_err(Error::sqlite("releasing a task's record"))?;
                self.conn
                    .prepare_cached(
                        "UPDATE task_records SET state = 'queued', started_at = NULL, \
                         foreman_pid = NULL WHERE id = ?1 AND state = 'running'",
                    )
                    .and_then(|mut s| s.execute([task.id]))
                    .map_err(Error::sqlite("releasing a task's record"))?;
            }
            Ok(())
        })?;
        self.wake.wake_after_commit("the released tasks are");
        Ok(())
    }

    fn wake_ups(&self) -> Receiver<()> {
        self.wake_rx.clone()
    }

    fn wake_ups_need_check(&self) -> bool {
        self.watch.as_ref().is_some_and(Watch::saw_it_go)
    }

    fn check_wake_ups(&mut self) -> Result<bool> {
        match &mut self.watch {
            Some(watch) => watch.rearm_if_gone(),
            None => Ok(false),
        }
    }

    fn next_due(&mut self) -> Result<Option<i64>> {
        queue::next_due(&self.conn, &self.cursor)
    }

    /// Also walks the rows due now from the table's start again at the next claim, which
    /// finds a row that a program stored below the cursor (`queue::Cursor`).
    fn sweep(&mut self) {
        self.sweep_undated = true;
        self.cursor.rewind();
    }

    fn counts(&mut self, now: i64) -> Result<Counts> {
        queue::counts(&self.conn, now)
    }

    fn rescue(&mut self, alive: &[u32]) -> Result<Vec<Orphan>> {
        records::mark_lost(&self.conn, alive)
    }

    fn show(&mut self, id: i64) -> Result<Option<Record>> {
        records::show(&self.conn, id)
    }

    fn cancel(&mut self, id: i64) -> Result<Cancelled> {
        records::cancel(&self.conn, id)
    }
}
