//! The foreman: one loop that claims due tasks, hands them to the worker pool, sleeps on
//! wake-ups and due times, and stops on signals.
//!
//! # Invariants (numbered as in SPEC.md) and why they hold
//!
//! 1. **At most once.** `queue::claim` deletes rows in the statement that returns them, and
//!    the loop asks for no more rows than it has free slots (`workers - running.len()`),
//!    so a claimed row is committed as gone before it is handed to a worker, and never
//!    waits in memory. A `kill -9` loses at most the tasks handed out and not finished:
//!    at most `--workers`. Two foremen on one database serialise their claims on SQLite's
//!    write lock; a row deleted by one is not there for the other. A monitor round is
//!    claimed the same way: `take_rounds` moves its `next_due` only if the row still holds
//!    the time it read, so of two foremen only the one whose move wrote starts the round.
//!    A row another program wrote badly cannot take the rows claimed with it: `queue::claim`
//!    returns it flagged unreadable, and the worker rejects it alone (invariant 7).
//!    With the queue on RabbitMQ (src/backend/rabbitmq.rs) the claim is the ack, sent on
//!    the connection that brought the message and confirmed by a round trip before the
//!    task is handed out; deliveries beyond the free slots wait unacknowledged, the
//!    broker's still.
//! 2. **Nothing lost that had not started.** The first signal moves the loop into
//!    `shut_down`, which claims nothing and starts no monitor round. Unclaimed rows are
//!    never touched.
//! 3. **Graceful deadline.** After the first signal `shut_down` waits on the completion
//!    channel with a deadline of `--graceful-timeout`. When it passes with command tasks
//!    running, it sets the pool's stop flag: each command's worker sends SIGTERM to its
//!    process group, SIGKILL `kill_after` later, and reports it `abandoned`; the wait goes
//!    on for the longest `kill_after` (plus `COMMAND_STOP_SLACK`). Then it logs every
//!    task still running by id and name, records it `abandoned`, and returns. A second
//!    signal ends the wait at once (the commands die with the process: the parent-death
//!    signal, src/command.rs). Either way `run` returns to its caller, so the pid file's
//!    guard removes the file.
//! 4. **Pid file.** Taken (`pidfile::PidFile`, an flock) before anything else is started,
//!    held until `run` returns.
//! 5. **Wake-ups.** The watch (src/wakeup.rs) is started before the old wake files are
//!    cleared and before the first claim, so a row committed at any time is either seen by
//!    that first claim or followed by an event. The inotify thread removes a wake file
//!    before it posts a token and the loop claims after taking the token. When no token
//!    comes the loop still re-reads the queue every `safety_interval` (5 s): a writer that
//!    forgot the file, or a lost event, costs at most that. If the directory itself is
//!    removed (inotify says so, and the safety re-read checks its inode), the loop makes
//!    it again, arms the watch on the new one and re-reads the queue (`check_watch`).
//!    The watch belongs to the SQLite queue (`QueueBackend::wake_ups`); on RabbitMQ a
//!    delivery, or the connection's failure, is the wake-up.
//! 6. **Bounded threads.** `--workers` pool threads, started once, plus the inotify thread,
//!    the signal thread, the telemetry thread (unless `--no-telemetry`) and this one:
//!    `workers + 4`, whatever the number of tasks or monitor rounds (monitors resolve host
//!    names on the worker itself, src/monitor/http_fetch.rs, not on a thread per lookup;
//!    a command task's worker polls its pipes and waits for it itself, src/command.rs).
//!    With `--amqp-url`, five more at most: the publisher (`snapq-amqp`, src/outbox.rs),
//!    lapin's executor (`snapq-amqp-io`), async-io's reactor, one thread of the `blocking`
//!    pool, and lapin's I/O loop while connected (src/rabbitmq.rs); reconnecting replaces
//!    the last, it does not add one. With `--queue amqp://…` the queue's connection
//!    (src/backend/rabbitmq.rs) shares that executor and reactor and adds its own I/O loop
//!    thread: at most four more (the loop polls the consumer's deliveries itself, woken by
//!    lapin's I/O loop through the wake-up channel; it acks and publishes itself). With
//!    `--mqtt-url`, two more: the publisher (`snapq-mqtt`) and the socket's reader
//!    (`snapq-mqtt-io`, src/brokers/mqtt.rs). With `--panic-configs`, two more: the
//!    configuration consumer (`snapq-panic-configs`, src/panic_configs.rs) and its own
//!    connection's I/O loop. With `--http`, two more (the live view's hub and acceptor) and
//!    one a connection while it is served, at most `--http-max-connections`
//!    (src/live/mod.rs).
//!    The live view never holds up this loop or a worker: they hand it events with a
//!    non-blocking `try_send` and it drops (and counts) what it cannot take.
//! 7. **Failures are contained.** Workers run tasks under `catch_unwind` and a guard that
//!    always reports back (src/pool.rs); a row that cannot run (unknown name, bad
//!    arguments) is reported as rejected — it was deleted when claimed, so it is never
//!    retried.
//! 8. **Single-threaded loop.** Claiming, dispatching, starting monitor rounds (which take
//!    worker slots like tasks), recording their results, signal handling, scheduling and
//!    the heartbeat happen here, on the thread that called `run`. The other threads only
//!    post to channels: wake tokens, signal numbers, completions. `next_event` is the one
//!    place that blocks. The loop's state is its own; the only locks other threads share
//!    are telemetry's buffer mutexes and the pool's registry lock (written on SIGHUP,
//!    read as a task starts), none held across I/O (src/telemetry.rs, src/pool.rs).
//!    Under systemd the loop itself sends WATCHDOG=1 (src/systemd.rs), so a loop that
//!    stops turning stops the pings and systemd restarts it.
//!    Schedules fire here too (`fire_schedules`): each due tick's task is inserted in the
//!    transaction that moves its schedule's `next_fire` on (src/schedules.rs), so of two
//!    foremen only one fires a tick, and a crash before the commit fires it after restart.
//! 9. **Every task leaves a record.** `records::claim` deletes the queue rows and inserts
//!    their records (`running`) in one transaction; the loop keeps each finished task's
//!    end in `finished_tasks` and writes them in its next claim transaction, or with
//!    `settle_tasks` when no claim is about to come (nothing more due, stopping, exiting):
//!    never a transaction per task. At the graceful deadline the tasks still
//!    running are recorded `abandoned`. A record left `running` by a foreman that died
//!    (kill -9, a crash) is marked `lost` when the next foreman starts, or within a few
//!    seconds by another foreman on the same database (`find_dead_foremen`, at each
//!    heartbeat), each logged by id (`records::mark_lost`); a live foreman keeps its own.
//! 10. **At least once, where asked.** A task type with a retry policy (`retry_policies`)
//!     is claimed by the same statement and transaction as any other, but its record
//!     carries `max_attempts`: the record, naming this foreman, is the lease. The loop
//!     keeps the policy of each running lease beside it in `running`; its end goes to
//!     `records::settle_lease` in the next claim or settle transaction, which writes the
//!     queue row back (same id, next attempt, due after the backoff) or records it `dead`.
//!     Nothing between the claim and that commit can drop the task: a `kill -9` leaves the
//!     record `running`, and `records::mark_lost` (at start, and at each heartbeat for dead
//!     foremen, as in invariant 9) writes the row back. The only runs twice are those whose
//!     foreman died or stopped at the deadline before their end was committed. A live
//!     foreman's leases are never written back: `mark_lost` skips the pids of foremen
//!     alive on the database (fresh heartbeat, a live snapq foreman process). Types
//!     without a policy have no `max_attempts`, and invariant 1 holds for them unchanged.
//! 11. **The loop keeps turning.** After start-up the loop's two connections wait at most
//!     `db::LOOP_BUSY_TIMEOUT` (100 ms) for a write lock another process holds (a bulk
//!     enqueue of millions of lines, a backup, `sqlite3` left in a transaction). A write that
//!     gives up changes nothing and is tried again `BUSY_RETRY` later: a claim at `next_due`,
//!     a schedule move at the next round's time, finished rounds' results on the next turn (kept in
//!     memory meanwhile), the heartbeat at the next beat. So a turn lasts at most a few of
//!     those waits, WATCHDOG=1 keeps going, and STATUS= says "database busy for N s".
//!     `snapq status` takes a late heartbeat from a live snapq process for a busy foreman,
//!     not a dead one.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, bounded, select};
use rusqlite::Connection;
use signal_hook::consts::SIGHUP;

use crate::backend::{Lease, QueueBackend, QueueTarget, RabbitQueue, SqliteQueue};
use crate::clock::now_micros;
use crate::clock::{format_micros, micros_of};
use crate::db::{self, Synchronous};
use crate::due::Due;
use crate::error::{Error, Result};
use crate::heartbeat;
use crate::live::{Event as LiveEvent, Live, LiveConfig, Publisher};
use crate::monitor::{self, Probe, RoundResult};
use crate::pidfile::PidFile;
use crate::pool::{Done, Job, JobKey, Outcome, Pool, RoundDone, RoundJob, round_ms};
use crate::queue;
use crate::records;
use crate::registry::{Registry, RetryPolicy};
use crate::signals::SignalThread;
use crate::sink::{FileSink, Sink};
use crate::systemd::Notifier;
use crate::tasks_file::TasksFile;
use crate::telemetry::{self, DUE_COUNT_CAP, Telemetry};

/// How often the foreman writes its heartbeat row (`snapq status`).
pub const HEARTBEAT_INTERVAL: Duration = Duration::from_secs(1);

/// The longest the foreman sits idle without re-reading the queue (invariant 5).
pub const SAFETY_INTERVAL: Duration = Duration::from_secs(5);

/// The page cache of the bookkeeping connection: as small as the queue's (its rows are
/// few and small; see `CONSUMER_CACHE_SIZE` for why small pays).
const FOREMAN_CACHE_SIZE: i64 = crate::backend::sqlite::CONSUMER_CACHE_SIZE;

/// How late a monitor round may start so that rounds due close together start in one
/// wake-up of the loop (and their schedule moves share one commit). With 1,000 monitors
/// every 10 s the loop otherwise woke 100 times a second, once per round.
const ROUND_SLACK: Duration = Duration::from_millis(20);

/// How long the loop polls for a completion before it sleeps, while it has a backlog and
/// tasks running (see `WORKER_SPIN` in src/pool.rs for why polling pays here).
const SPIN: Duration = Duration::from_micros(100);

/// Polling (the loop's `SPIN`, `gather_completions`, the workers' `WORKER_SPIN`) pays only
/// while tasks are this short, typically: then a completion or the next job is likely to
/// come while the thread polls. Longer tasks (commands: milliseconds each) would only
/// lose the CPU their processes need to the polling: 5,000 `/bin/true` commands drained
/// ~10% slower with it on this 2-core machine (BENCHMARKS.md, "Command tasks").
const SHORT_TASK: Duration = Duration::from_millis(1);

/// The longest `gather_completions` waits, whatever a claim costs.
const MAX_GATHER: Duration = Duration::from_millis(2);

/// Task records pruned in one transaction (about a millisecond in a release build), and
/// the pause before the next batch while a backlog remains. Batches never run back to
/// back: an enqueuer's busy handler polls the write lock every millisecond at most, and
/// transactions one after another would keep it from ever finding the lock free (a CI run
/// saw an enqueue wait 69 ms behind 20 ms of back-to-back batches). Pruning goes at up to
/// ~50,000 records a second, above the fastest drain (BENCHMARKS.md).
const PRUNE_BATCH: i64 = 250;
const PRUNE_PAUSE: Duration = Duration::from_millis(5);

/// Past the graceful deadline, how long after the longest `kill_after` the foreman waits
/// for stopped commands' workers to report: their poll step, and reaping.
const COMMAND_STOP_SLACK: Duration = Duration::from_millis(500);

/// How long the loop waits before it tries again a write that found the database busy.
const BUSY_RETRY: Duration = Duration::from_millis(200);

/// The most finished monitor rounds kept in memory while the database cannot record them
/// (a round a second for ~3 hours with one monitor; beyond it the oldest are dropped).
const MAX_UNRECORDED: usize = 10_000;

/// A finished round, its result made and waiting to be recorded.
struct FinishedRound {
    result: RoundResult,
    /// What the round left for the next one.
    state: serde_json::Value,
    started_us: i64,
}

/// Everything `snapq run` needs, resolved and validated.
#[derive(Debug, Clone)]
pub struct ForemanConfig {
    pub db: PathBuf,
    pub wakeup_dir: PathBuf,
    /// `None` with `--no-pid-file`.
    pub pid_file: Option<PathBuf>,
    /// Where telemetry CSV files go; `None` with `--no-telemetry`.
    pub telemetry_dir: Option<PathBuf>,
    /// Where monitor results go when no other sink is given (`results.jsonl`).
    pub results_file: PathBuf,
    pub synchronous: Synchronous,
    /// At most this many tasks run at once (≥ 1).
    pub workers: usize,
    /// At most this many rows per claim transaction (≥ 1).
    pub batch: usize,
    pub graceful_timeout: Duration,
    /// Run what is due, wait for it, return.
    pub burst: bool,
    pub safety_interval: Duration,
    /// Task records older than this are pruned (`--history-retention`).
    pub history_retention: Duration,
    /// About this many of the newest task records are kept (`--history-max-rows`).
    pub history_max_rows: u64,
    /// The live view (`--http`), if any.
    pub live: Option<LiveConfig>,
    /// The command tasks' file, read at start (a bad file stops the start) and again on
    /// SIGHUP (a bad file is logged and the tasks stay as they were).
    pub tasks_file: Option<TasksFile>,
    /// Where the task queue is: the database above, or a RabbitMQ queue (then the
    /// database keeps this foreman's records, monitors and schedules).
    pub queue: QueueTarget,
}

impl ForemanConfig {
    /// The settings `snapq run` starts with, every file in `paths` (the CLI's layout);
    /// change the fields to taste.
    pub fn from_paths(paths: &crate::config::Paths) -> ForemanConfig {
        ForemanConfig {
            db: paths.db.clone(),
            wakeup_dir: paths.wakeup_dir.clone(),
            pid_file: paths.pid_file.clone(),
            telemetry_dir: Some(paths.telemetry_dir.clone()),
            results_file: paths.results_file.clone(),
            synchronous: Synchronous::default(),
            workers: 4,
            batch: 100,
            graceful_timeout: Duration::from_secs(30),
            burst: false,
            safety_interval: SAFETY_INTERVAL,
            history_retention: Duration::from_secs(7 * 24 * 3600),
            history_max_rows: 100_000,
            live: None,
            tasks_file: None,
            queue: QueueTarget::Sqlite,
        }
    }

    /// `from_paths` for a home directory: the database, wake-up directory, pid file,
    /// telemetry and results all under `home`, as `snapq --home HOME run` has them.
    pub fn in_home(home: impl Into<PathBuf>) -> Result<ForemanConfig> {
        let paths = crate::config::Paths::resolve(&crate::config::PathOverrides {
            home: Some(home.into()),
            ..Default::default()
        })?;
        Ok(ForemanConfig::from_paths(&paths))
    }
}

/// What the loop reacts to. `next_event` returns one of these; bursts of completions are
/// drained in the same turn.
enum LoopEvent {
    /// A wake-up token: rows may have been committed.
    Wake,
    /// SIGTERM or SIGINT (stop), or SIGHUP (reload).
    Signal(i32),
    /// A worker finished a task.
    Done(Done),
    /// The deadline passed: a delayed task is due, a heartbeat or the safety re-read.
    Timeout,
}

/// How a run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stopped {
    /// `--burst`: nothing due was left.
    Drained,
    /// A signal, and every running task finished in time.
    Gracefully,
    /// A signal, and tasks were still running at the deadline or a second signal.
    Abandoned { tasks: usize },
}

/// Counters over one run, for logs and benchmarks.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Totals {
    pub succeeded: u64,
    pub failed: u64,
}

/// Runs the foreman until a signal (or, with `burst`, until nothing is due), publishing
/// monitor results to `config.results_file`.
pub fn run(config: &ForemanConfig, registry: Registry) -> Result<(Stopped, Totals)> {
    let sink = FileSink::open(&config.results_file)?;
    run_with_sink(config, registry, Box::new(sink))
}

/// Runs the foreman with monitor results going to `sink`.
pub fn run_with_sink(
    config: &ForemanConfig,
    registry: Registry,
    sink: Box<dyn Sink>,
) -> Result<(Stopped, Totals)> {
    if config.workers == 0 || config.batch == 0 {
        return Err(Error::bad_input("--workers/--batch", "must be at least 1"));
    }
    // The programme's own tasks; the tasks file's are added to a copy at each load.
    let base = registry;
    let registry = match &config.tasks_file {
        Some(file) => {
            let registry = file.with_commands(&base)?;
            file.warn_of_missing_programs(&registry);
            registry
        }
        None => base.clone(),
    };
    // Signals first: from here on SIGTERM is ours to handle, never the default death.
    let signals = SignalThread::start()?;
    let mut books = db::open(&config.db, Synchronous::Normal)?;
    db::set_and_verify(&books, "cache_size", FOREMAN_CACHE_SIZE)?;
    let _pid_file = config
        .pid_file
        .as_deref()
        .map(PidFile::acquire)
        .transpose()?;
    // The SQLite queue starts its wake-up watch (invariant 5) after the pid file: a second
    // foreman is refused before it touches anything.
    let mut queue: Box<dyn QueueBackend> = match &config.queue {
        QueueTarget::Sqlite => Box::new(SqliteQueue::consumer(
            &config.db,
            &config.wakeup_dir,
            config.synchronous,
        )?),
        QueueTarget::RabbitMq { url, name } => Box::new(RabbitQueue::consumer(
            url,
            name,
            &config.db,
            config.synchronous,
            u16::try_from(config.workers).unwrap_or(u16::MAX),
        )?),
    };
    let live = config.live.clone().map(Live::start).transpose()?;
    queue::record_task_types(&books, &registry)?;
    let started_at = now_micros();
    let pid = std::process::id();
    heartbeat::register(&books, pid, started_at, config.workers)?;
    // Records left `running` by foremen that are gone: those tasks were lost with them,
    // or, if leased, go back in the queue.
    log_orphans(queue.rescue(&heartbeat::live_foremen(&books, pid)?)?);
    // From here on the loop's writes give up on a held lock quickly and are retried on the
    // loop's own schedule (invariant 11); the writes above may wait for it as long as any
    // enqueuer does.
    queue.started()?;
    db::wait_briefly_when_busy(&mut books)?;
    let wake_rx = queue.wake_ups();

    let telemetry = config
        .telemetry_dir
        .as_deref()
        .map(telemetry::Running::start)
        .transpose()?;

    // Capacity = workers: each slot has at most one report outstanding (src/pool.rs).
    let (done_tx, done_rx) = bounded::<Done>(config.workers);
    let max_kill_after = registry.max_kill_after();
    let retry_policies = registry.retry_policies();
    let pool = Pool::start(
        config.workers,
        Arc::new(registry),
        done_tx,
        telemetry.as_ref().map(|t| Arc::clone(t.telemetry())),
        live.as_ref().map(Live::publisher),
    )?;
    // While a claim waits for a broker's answer, workers polling for its jobs only take
    // the CPU from the broker and lapin's threads: one polls, the others sleep
    // (src/pool.rs). A SQLite claim comes back in microseconds: every idle worker polls.
    pool.set_pollers(if queue.capabilities().claims_wait_for_round_trip {
        1
    } else {
        config.workers
    });
    tracing::info!(
        pid,
        workers = config.workers,
        db = %config.db.display(),
        wakeup_dir = %config.wakeup_dir.display(),
        burst = config.burst,
        "foreman ready"
    );

    let mut foreman = Foreman {
        config,
        base,
        max_kill_after,
        queue,
        books,
        finished_rounds: Vec::new(),
        record_retry: None,
        pool: Some(pool),
        wake_rx,
        signal_rx: signals.rx.clone(),
        done_rx,
        running: HashMap::with_capacity(config.workers),
        retry_policies,
        maybe_due: true,
        next_due: None,
        last_read: Instant::now(),
        next_beat: Instant::now() + HEARTBEAT_INTERVAL,
        next_prune: None,
        prune_floor: None,
        claim_cost: Duration::ZERO,
        typical_task: Duration::ZERO,
        claim_failed: false,
        fatal: None,
        busy_since: None,
        stop_deadline: None,
        totals: Totals::default(),
        // Monitors run and schedules fire in a long-lived foreman only; `--burst` is for
        // tasks.
        rounds: Due::new(!config.burst, ROUND_SLACK),
        ticks: Due::new(!config.burst, Duration::ZERO),
        wake: crate::wakeup::WakeDir::prepare(&config.wakeup_dir)?,
        probes: HashMap::new(),
        sink,
        notifier: Notifier::from_env(),
        telemetry: telemetry.as_ref().map(|t| Arc::clone(t.telemetry())),
        live: live.as_ref().map(Live::publisher),
    };
    let status = foreman.status_line();
    foreman.notifier.ready(&status);
    foreman.publish_queue_figures();
    let result = foreman.run_loop();
    foreman.settle_tasks();
    if let Err(e) = heartbeat::unregister(&foreman.books, i64::from(pid)) {
        tracing::warn!("could not remove this foreman's heartbeat row: {e}");
    }
    let totals = foreman.totals;
    if let Some(pool) = foreman.pool.take() {
        match result {
            Ok(Stopped::Abandoned { .. }) => pool.abandon(),
            _ => pool.join(),
        }
    }
    // After the pool is joined, so every finished task's samples are in (invariant 3's
    // graceful path flushes them all).
    if let Some(telemetry) = telemetry {
        telemetry.stop();
    }
    if let Some(live) = live {
        live.stop();
    }
    drop(signals);
    let stopped = result?;
    tracing::info!(
        ?stopped,
        succeeded = totals.succeeded,
        failed = totals.failed,
        "foreman stopped"
    );
    Ok((stopped, totals))
}

struct Foreman<'a> {
    config: &'a ForemanConfig,
    /// The registry the programme gave, before the tasks file's commands (SIGHUP adds
    /// the file's current ones to a copy).
    base: Registry,
    /// The longest `kill_after` of the command tasks loaded: how long stopping running
    /// commands at the graceful deadline may take.
    max_kill_after: Option<Duration>,
    /// The task queue (src/backend): only this thread claims (invariant 8). The SQLite
    /// one commits with the user's `--synchronous`, and its records with its claims.
    queue: Box<dyn QueueBackend>,
    /// The bookkeeping connection: monitor schedules and results, schedules, the heartbeat,
    /// pruning of records. It
    /// commits with `synchronous = NORMAL` whatever `--synchronous` says: these rows survive
    /// any crash of snapq, and what power loss may undo (the last rounds' results, a
    /// schedule move, a beat) the next round or beat writes again. An fsync per round was a
    /// fifth of the foreman's CPU with 1,000 monitors (BENCHMARKS.md).
    books: Connection,
    /// Rounds finished and not yet recorded: recorded together, in one transaction, once
    /// the loop has taken every completion that arrived. A transaction that fails (a busy
    /// database) leaves them here for the next turn, up to `MAX_UNRECORDED`.
    finished_rounds: Vec<FinishedRound>,
    /// After a failed attempt, `finished_rounds` are recorded again no earlier than this.
    record_retry: Option<Instant>,
    pool: Option<Pool>,
    wake_rx: Receiver<()>,
    signal_rx: Receiver<i32>,
    done_rx: Receiver<Done>,
    /// Jobs handed to workers and not yet reported: key → (name, start, and the policy a
    /// lease was claimed under, for its end: invariant 10). Its length is the number of
    /// busy slots.
    running: HashMap<JobKey, (String, Instant, Option<RetryPolicy>)>,
    /// The task types run at least once, by name (the registry's, again at each SIGHUP).
    retry_policies: HashMap<String, RetryPolicy>,
    /// False only after a claim came back short (no more due rows) and nothing since
    /// suggested new ones: then completions need no claim query.
    maybe_due: bool,
    /// The due time of the earliest row not yet due, read when a claim came back short.
    next_due: Option<i64>,
    /// When the queue was last read (safety re-read, invariant 5).
    last_read: Instant,
    next_beat: Instant,
    /// When the next batch of task records is pruned: set by each heartbeat, and again
    /// `PRUNE_PAUSE` after a batch that found more to prune; None when nothing is left.
    next_prune: Option<Instant>,
    /// For the pass under way: the oldest record kept by `--history-max-rows`
    /// (`records::oldest_of_newest`, read once a pass: it walks up to that many index
    /// entries); `Some(None)` when there are no more records than that.
    prune_floor: Option<Option<i64>>,
    /// How long tasks (not rounds) run lately (a moving average of the last few); polling pays only
    /// while it is below `SHORT_TASK`.
    typical_task: Duration,
    /// What a claim transaction costs lately; bounds `gather_completions`.
    claim_cost: Duration,
    /// The last claim failed and is to be tried again at `next_due` (`--burst` must not
    /// take that for an empty queue).
    claim_failed: bool,
    /// `--burst` gave up on the queue: returned once the running tasks end (exit 1).
    fatal: Option<Error>,
    /// From the first stop signal: when the foreman exits whatever still runs (Unix µs),
    /// written with the heartbeat for `status`.
    stop_deadline: Option<i64>,
    /// Since when the database has refused this loop its write lock (another process
    /// holds it), if it does now: said in STATUS= and in the log (invariant 11).
    busy_since: Option<Instant>,
    totals: Totals,
    /// Monitors' rounds (src/monitor/store.rs) and schedules' ticks (src/schedules.rs):
    /// whether some may be due, and the earliest next time read (src/due.rs).
    rounds: Due,
    ticks: Due,
    /// Where the foreman pokes the other foremen on this database after firing schedules.
    wake: crate::wakeup::WakeDir,
    /// Validated configs by monitor name, with their version, so a round does not parse
    /// and check its config again.
    probes: HashMap<String, (i64, Arc<dyn Probe>)>,
    sink: Box<dyn Sink>,
    /// systemd's notify socket, if any: READY, STATUS, STOPPING, WATCHDOG.
    notifier: Notifier,
    /// Where the heartbeat publishes the queue figures for the runtime sample.
    telemetry: Option<Arc<Telemetry>>,
    /// The live view's event queue: recorded monitor results go there.
    live: Option<Publisher>,
}

impl Foreman<'_> {
    /// What `systemctl status` shows beside the unit.
    fn status_line(&self) -> String {
        if let Some(deadline) = self.stop_deadline {
            let left = (deadline - now_micros()).max(0) as f64 / 1e6;
            return format!(
                "stopping: waiting up to {left:.0} s more for {} running",
                self.running.len()
            );
        }
        let mut line = format!(
            "{} of {} workers busy; {} tasks done, {} failed",
            self.running.len(),
            self.config.workers,
            self.totals.succeeded,
            self.totals.failed
        );
        if let Some(since) = self.busy_since {
            line.push_str(&format!(
                "; database busy for {} s (another process holds its write lock)",
                since.elapsed().as_secs()
            ));
        }
        line
    }

    /// A write of the loop went through: the database is not (or no longer) busy.
    fn db_free(&mut self) {
        if let Some(since) = self.busy_since.take() {
            tracing::info!(
                busy_s = since.elapsed().as_millis() as f64 / 1e3,
                "the database is free again"
            );
        }
    }

    /// A write of the loop failed with `e`; says so (a busy database once, until it is
    /// free again) and returns how soon to try again.
    fn db_failed(&mut self, what: &str, e: &Error) -> Duration {
        if !e.is_busy() {
            tracing::error!("{what} failed, retrying in 1 s: {e}");
            return Duration::from_secs(1);
        }
        if self.busy_since.is_none() {
            self.busy_since = Some(Instant::now());
            tracing::warn!(
                "the database is busy: another process holds its write lock (a long bulk \
                 enqueue, a backup, sqlite3 in a transaction); {what} waits, the loop goes on \
                 and tries again every {} ms",
                BUSY_RETRY.as_millis()
            );
        }
        BUSY_RETRY
    }

    fn run_loop(&mut self) -> Result<Stopped> {
        loop {
            if self.rounds.maybe_due() && self.running.len() < self.config.workers {
                self.start_due_rounds()?;
            }
            if self.maybe_due && self.fatal.is_none() && self.running.len() < self.config.workers {
                self.claim_and_dispatch()?;
            }
            // After the claim: most wake-ups are enqueues, and their tasks need not wait
            // for the read of the next schedule.
            if self.ticks.maybe_due() {
                self.fire_schedules();
            }
            // With more due, the claim that the next free slot brings carries the finished
            // tasks' states (a task only finishes by freeing a slot); otherwise they are
            // written now, in a transaction of their own.
            if !self.maybe_due || self.fatal.is_some() {
                self.settle_tasks();
            }
            if self.config.burst && self.running.is_empty() {
                if let Some(e) = self.fatal.take() {
                    return Err(e);
                }
                // A short claim says the SQLite queue is empty; a broker's deliveries
                // arrive on their own time, so it is asked (and a delivery wakes the loop).
                if !self.maybe_due && !self.claim_failed && self.queue.drained().unwrap_or(false) {
                    return Ok(Stopped::Drained);
                }
            }
            if Instant::now() >= self.next_beat {
                self.beat();
            }
            if self.next_prune.is_some_and(|t| Instant::now() >= t) {
                self.prune_records();
            }
            self.notifier.watchdog();
            // Jobs queued behind a running one that seemed tiny get a worker (src/pool.rs).
            let mut deadline = self.deadline();
            if let Some(attend) = self.pool.as_ref().and_then(Pool::attend) {
                deadline = deadline.min(attend);
            }
            match self.next_event(deadline) {
                LoopEvent::Wake => {
                    self.maybe_due = true;
                    self.rounds.poke();
                    self.ticks.poke();
                    if self.queue.wake_ups_need_check() {
                        self.check_watch();
                    }
                }
                LoopEvent::Signal(SIGHUP) => self.reload(),
                LoopEvent::Done(done) => {
                    self.finished(done);
                    if self.maybe_due && self.typical_task < SHORT_TASK {
                        self.gather_completions();
                    }
                }
                LoopEvent::Signal(signal) => return self.shut_down(signal),
                LoopEvent::Timeout => {
                    let now = now_micros();
                    let safety = self.last_read.elapsed() >= self.config.safety_interval;
                    if safety {
                        self.check_watch();
                        self.queue.sweep();
                    }
                    if safety || self.next_due.is_some_and(|t| t <= now) {
                        self.maybe_due = true;
                    }
                    self.rounds.check(now, safety);
                    self.ticks.check(now, safety);
                }
            }
            // Completions that arrived meanwhile free their slots before the next claim,
            // so one claim fills them all.
            while let Ok(done) = self.done_rx.try_recv() {
                self.finished(done);
            }
            self.record_rounds();
        }
    }

    /// Arms the wake-up watch again if its directory was removed (issue 13, item 6); the
    /// wake-ups lost meanwhile are made up by reading the queue and monitors now.
    fn check_watch(&mut self) {
        match self.queue.check_wake_ups() {
            Ok(false) => {}
            Ok(true) => {
                self.maybe_due = true;
                self.rounds.poke();
                self.ticks.poke();
            }
            Err(e) => tracing::error!(
                "the wake-up directory is gone and cannot be watched again ({e}); \
                 reading the queue every {:.0} s until it can",
                self.config.safety_interval.as_secs_f64()
            ),
        }
    }

    /// SIGHUP (`systemctl reload`): reloads what can change under a running foreman and
    /// never stops the loop. Monitor configs are validated again from the database, the
    /// wake-up watch is checked, and the queue and monitors are read again. The log filter
    /// (RUST_LOG) is read at start only: change it with a restart.
    fn reload(&mut self) {
        self.reload_tasks();
        self.probes.clear();
        self.check_watch();
        self.maybe_due = true;
        self.rounds.poke();
        self.ticks.poke();
        tracing::info!(
            "SIGHUP: reloaded (monitor configs checked again, wake-up watch checked, queue \
             read again); the foreman goes on"
        );
    }

    /// Fires the schedules that are due (src/schedules.rs: each tick's task enqueued in the
    /// transaction that moves its schedule on), then reads when the next tick is.
    fn fire_schedules(&mut self) {
        self.ticks.take();
        let now = now_micros();
        // A read first: most wake-ups are enqueues, and take no write lock for schedules.
        match crate::schedules::earliest(&self.books) {
            Ok(next) if next.is_none_or(|t| t > now) => {
                self.ticks.set_next(next);
                return;
            }
            Ok(_) => {}
            Err(e) => {
                tracing::warn!("could not read the next schedule, reading again in 1 s: {e}");
                self.ticks.set_next(Some(now + 1_000_000));
                return;
            }
        }
        let fired = if self.config.queue == QueueTarget::Sqlite {
            crate::schedules::fire_due(&self.books, now)
        } else {
            // A broker's queue: the ticks' tasks are published (and confirmed) inside the
            // transaction that moves the schedules on.
            let queue = &mut self.queue;
            crate::schedules::fire_due_into(&self.books, now, |_, ticks| {
                queue.enqueue(&crate::schedules::as_new_tasks(ticks)?)
            })
        };
        match fired {
            Ok(fired) => {
                self.db_free();
                for (schedule, tick, id) in &fired.tasks {
                    tracing::info!(
                        %schedule,
                        id,
                        tick = %format_micros(*tick),
                        "schedule fired"
                    );
                }
                for (schedule, skipped) in &fired.skipped {
                    tracing::warn!(
                        %schedule,
                        skipped,
                        "schedule ticks skipped (passed while no foreman ran; see its --catch-up)"
                    );
                }
                if !fired.tasks.is_empty() && self.config.queue == QueueTarget::Sqlite {
                    self.maybe_due = true;
                    // Other foremen on this database learn of the tasks at once too.
                    self.wake.wake_after_commit("the scheduled tasks are");
                }
            }
            Err(e) => {
                let retry = self.db_failed("firing schedules", &e);
                self.ticks.set_next(Some(now + micros_of(retry)));
                return;
            }
        }
        match crate::schedules::earliest(&self.books) {
            Ok(next) => self.ticks.set_next(next),
            Err(e) => {
                tracing::warn!("could not read the next schedule, reading again in 1 s: {e}");
                self.ticks.set_next(Some(now + 1_000_000));
            }
        }
    }

    /// Reads the tasks file again: tasks claimed from now on run with its definitions,
    /// and enqueuers learn its tasks (`task_types`). A file that is now bad changes
    /// nothing: the error is logged and the tasks stay as they were.
    fn reload_tasks(&mut self) {
        let Some(file) = &self.config.tasks_file else {
            return;
        };
        let registry = match file.with_commands(&self.base) {
            Ok(registry) => {
                file.warn_of_missing_programs(&registry);
                registry
            }
            Err(e) => {
                tracing::error!("SIGHUP: {e}; the tasks stay as they were");
                return;
            }
        };
        if let Err(e) = queue::record_task_types(&self.books, &registry) {
            tracing::warn!("SIGHUP: could not record the task types for enqueuers: {e}");
        }
        let commands = registry.specs().count() - self.base.specs().count();
        tracing::info!(
            file = %file.path.display(),
            commands,
            "SIGHUP: tasks file read again"
        );
        self.max_kill_after = self.max_kill_after.max(registry.max_kill_after());
        self.retry_policies = registry.retry_policies();
        if let Some(pool) = &self.pool {
            pool.reload(registry);
        }
    }

    /// When the loop must wake up even if no event comes.
    fn deadline(&self) -> Instant {
        let now = Instant::now();
        if self.maybe_due && self.running.len() < self.config.workers {
            // There is work to claim: do not sleep.
            return now;
        }
        let mut deadline = self
            .next_beat
            .min(self.last_read + self.config.safety_interval);
        if let Some(watchdog) = self.notifier.next_watchdog() {
            deadline = deadline.min(watchdog);
        }
        if let Some(retry) = self.record_retry {
            deadline = deadline.min(retry);
        }
        if let Some(prune) = self.next_prune {
            deadline = deadline.min(prune);
        }
        for due in [self.next_due, self.rounds.wake_at(), self.ticks.wake_at()]
            .into_iter()
            .flatten()
        {
            let wait = Duration::from_micros(due.saturating_sub(now_micros()).max(0) as u64);
            deadline = deadline.min(now + wait);
        }
        deadline
    }

    /// The one place that blocks.
    fn next_event(&self, deadline: Instant) -> LoopEvent {
        if self.maybe_due && !self.running.is_empty() && self.typical_task < SHORT_TASK {
            let until = (Instant::now() + SPIN).min(deadline);
            while Instant::now() < until {
                if let Ok(done) = self.done_rx.try_recv() {
                    return LoopEvent::Done(done);
                }
                std::thread::yield_now();
            }
        }
        let timeout = deadline.saturating_duration_since(Instant::now());
        select! {
            recv(self.signal_rx) -> sig => sig.map_or(LoopEvent::Timeout, LoopEvent::Signal),
            recv(self.done_rx) -> done => done.map_or(LoopEvent::Timeout, LoopEvent::Done),
            recv(self.wake_rx) -> token => token.map_or(LoopEvent::Timeout, |()| LoopEvent::Wake),
            default(timeout) => LoopEvent::Timeout,
        }
    }

    /// With a backlog, every claim is a transaction (with `full`, an fsync), so claiming
    /// for each freed slot alone wastes most of it on fixed cost. Wait for more completions,
    /// but no longer than one claim costs: then the waiting never costs more than the
    /// claim it saves (ski rental), and a slow task never holds up a free slot for long.
    fn gather_completions(&mut self) {
        let want = self.config.batch.min(self.config.workers);
        let until = Instant::now() + self.claim_cost;
        while !self.running.is_empty()
            && self.config.workers - self.running.len() < want
            && Instant::now() < until
        {
            match self.done_rx.try_recv() {
                Ok(done) => self.finished(done),
                Err(_) => std::thread::yield_now(),
            }
        }
    }

    fn claim_and_dispatch(&mut self) -> Result<()> {
        let free = self.config.workers - self.running.len();
        let asked = free.min(self.config.batch);
        let started = Instant::now();
        self.last_read = started;
        let policies = &self.retry_policies;
        // With the SQLite queue one transaction: the finished tasks' states, the claim,
        // the claimed tasks' records (invariants 1, 9 and 10).
        let claimed = self.queue.claim(asked, &|name| policies.get(name).copied());
        // An exponentially weighted mean over the last ~8 claims.
        self.claim_cost = (self.claim_cost * 7 + started.elapsed().min(MAX_GATHER)) / 8;
        let claimed = match claimed {
            Ok(claimed) => {
                self.claim_failed = false;
                self.db_free();
                claimed
            }
            Err(e) => {
                // A busy or failing database: say so and try again shortly rather than die
                // with tasks running. `--burst` gives up on a failure that is not a busy
                // database at once, and on a busy one after `db::BUSY_TIMEOUT`, like an
                // enqueuer would (exit 1).
                let retry = self.db_failed("claiming tasks", &e);
                self.maybe_due = false;
                self.claim_failed = true;
                self.next_due = Some(now_micros() + micros_of(retry));
                let busy_for = self.busy_since.map_or(Duration::ZERO, |t| t.elapsed());
                if self.config.burst && (!e.is_busy() || busy_for >= db::BUSY_TIMEOUT) {
                    self.fatal = Some(e);
                    self.claim_failed = false;
                    self.next_due = None;
                }
                return Ok(());
            }
        };
        // A full claim means more is due: idle workers poll for their next job rather
        // than sleep (src/pool.rs, WORKER_SPIN).
        let Some(pool) = self.pool.as_ref() else {
            return Err(Error::Runtime("the worker pool is gone".into()));
        };
        let short = claimed.len() < asked;
        pool.set_backlog(!short && self.typical_task < SHORT_TASK);
        for Lease { task, retry } in claimed {
            self.running.insert(
                JobKey::Task(task.id),
                (task.task_name.clone(), Instant::now(), retry),
            );
            pool.submit(Job::Task(task))?;
        }
        // Read after dispatching, so the tasks already claimed do not wait for it.
        if short {
            self.maybe_due = false;
            self.next_due = self.queue.next_due().unwrap_or_else(|e| {
                tracing::error!("reading the next due time failed: {e}");
                Some(now_micros() + 1_000_000)
            });
        }
        Ok(())
    }

    fn finished(&mut self, done: Done) {
        let lease = self
            .running
            .remove(&done.key)
            .and_then(|(_, _, retry)| retry);
        // An average over about the last eight tasks (monitor rounds, HTTP calls of
        // milliseconds, would stop the polling that a drain of short tasks needs).
        if matches!(done.key, JobKey::Task(_)) {
            self.typical_task = (self.typical_task * 7 + done.duration) / 8;
        }
        match (done.key, done.outcome) {
            (JobKey::Round(name, version), Outcome::Round(done_round)) => {
                let RoundDone {
                    kind,
                    round,
                    started_us,
                } = *done_round;
                let (data, error) = match round.outcome {
                    Ok(data) => (Some(data), None),
                    Err(e) => (None, Some(e)),
                };
                let result = RoundResult {
                    monitor: name,
                    kind,
                    version,
                    ok: error.is_none(),
                    started_at: format_micros(started_us),
                    duration_ms: round_ms(done.duration),
                    data,
                    error,
                    panic: round.panic,
                };
                self.finished_rounds.push(FinishedRound {
                    result,
                    state: round.state,
                    started_us,
                });
            }
            (JobKey::Task(id), outcome) => {
                let (state, error) = match outcome {
                    Outcome::Succeeded => ("succeeded", None),
                    Outcome::Failed(e) => ("failed", Some(e)),
                    Outcome::Panicked(e) => ("panicked", Some(e)),
                    Outcome::Rejected(e) => ("rejected", Some(e)),
                    Outcome::TimedOut(e) => ("timed_out", Some(e)),
                    Outcome::Abandoned(e) => ("abandoned", Some(e)),
                    Outcome::Round(_) => ("failed", Some("a round reported for a task".into())),
                };
                if state == "succeeded" {
                    self.totals.succeeded += 1;
                } else {
                    self.totals.failed += 1;
                }
                self.queue.settle(records::Finish {
                    id,
                    state,
                    error,
                    at: now_micros(),
                    command: done.command,
                    retry: lease,
                });
            }
            (JobKey::Round(..), _) => {}
        }
    }

    /// Writes the finished tasks' states when no claim is about to carry them (nothing more
    /// due, stopping, exiting). A busy database keeps them for the next turn.
    fn settle_tasks(&mut self) {
        if self.queue.unsettled() == 0 {
            return;
        }
        match self.queue.flush() {
            Ok(requeued) => {
                self.db_free();
                // A retry put back: the loop must wake for it.
                if let Some(due) = requeued {
                    self.next_due = Some(self.next_due.map_or(due, |t| t.min(due)));
                }
            }
            Err(e) => {
                self.db_failed("recording finished tasks", &e);
            }
        }
    }

    /// Starts the rounds that are due, as far as free slots allow. A monitor whose round
    /// of the same version is still running skips this one (an overrun is logged, not
    /// queued up); a round of an older version does not block a newer one, whose update
    /// must take effect within a second (its older result is discarded in `record_round`).
    fn start_due_rounds(&mut self) -> Result<()> {
        self.rounds.take();
        let now = now_micros();
        let free = self.config.workers - self.running.len();
        let running_rounds = self
            .running
            .keys()
            .filter(|k| matches!(k, JobKey::Round(..)))
            .count();
        let due = match monitor::store::due(&self.books, now, free + running_rounds) {
            Ok(due) => due,
            Err(e) => {
                tracing::error!("reading due monitors failed, retrying in 1 s: {e}");
                self.rounds.set_next(Some(now + 1_000_000));
                return Ok(());
            }
        };
        // Move every due row's schedule in one transaction, then start what may start.
        let to_start = match self.take_rounds(due, free, now) {
            Ok(to_start) => {
                self.db_free();
                to_start
            }
            Err(e) => {
                // Nothing was moved, so nothing starts: the same rounds are due next time.
                let retry = self.db_failed("scheduling monitor rounds", &e);
                self.rounds.set_next(Some(now + micros_of(retry)));
                return Ok(());
            }
        };
        for row in to_start {
            let probe = match self.probe(&row) {
                Ok(probe) => probe,
                Err(message) => {
                    tracing::error!(monitor = %row.name, "cannot run the monitor: {message}");
                    continue;
                }
            };
            let job = RoundJob {
                name: row.name.clone(),
                kind: row.kind,
                version: row.version,
                probe,
                state: serde_json::from_str(&row.state).unwrap_or(serde_json::Value::Null),
            };
            self.running.insert(
                JobKey::Round(row.name.clone(), row.version),
                (format!("monitor:{}", row.name), Instant::now(), None),
            );
            let Some(pool) = self.pool.as_ref() else {
                return Err(Error::Runtime("the worker pool is gone".into()));
            };
            pool.submit(Job::Round(job))?;
        }
        self.rounds
            .set_next(monitor::store::next_due(&self.books).unwrap_or_else(|e| {
                tracing::error!("reading the next monitor round failed: {e}");
                Some(now + 1_000_000)
            }));
        Ok(())
    }

    /// Moves the schedule of each due round this foreman may start now, in one
    /// transaction, and returns those rounds. A round whose schedule another foreman on the
    /// same database moved first is that foreman's to run (invariant 1 for monitors: one
    /// round per tick, however many foremen).
    fn take_rounds(
        &mut self,
        due: Vec<monitor::store::Due>,
        free: usize,
        now: i64,
    ) -> Result<Vec<monitor::store::Due>> {
        let mut to_start = Vec::new();
        let tx = self
            .books
            .unchecked_transaction()
            .map_err(Error::sqlite("starting to schedule rounds"))?;
        for row in due {
            if to_start.len() == free {
                // More may be due: look again when a slot frees.
                self.rounds.poke();
                break;
            }
            if !monitor::store::reschedule(&tx, &row, now)? {
                continue;
            }
            if self
                .running
                .contains_key(&JobKey::Round(row.name.clone(), row.version))
            {
                tracing::warn!(
                    monitor = %row.name,
                    interval_s = row.interval_us as f64 / 1e6,
                    "the previous round is still running after a whole interval; skipping this one"
                );
                continue;
            }
            to_start.push(row);
        }
        tx.commit()
            .map_err(Error::sqlite("committing the schedule"))?;
        Ok(to_start)
    }

    /// The validated config of a due monitor, from the cache when its version is current.
    fn probe(&mut self, row: &monitor::store::Due) -> Result<Arc<dyn Probe>, String> {
        if let Some((version, probe)) = self.probes.get(&row.name)
            && *version == row.version
        {
            return Ok(Arc::clone(probe));
        }
        let kind = monitor::kind(&row.kind)
            .ok_or_else(|| format!("unknown kind {:?} (a newer snapq wrote it?)", row.kind))?;
        let config: serde_json::Value = serde_json::from_str(&row.config)
            .map_err(|e| format!("the stored config is not JSON: {e}"))?;
        let probe = kind.prepare(&config)?;
        self.probes
            .insert(row.name.clone(), (row.version, Arc::clone(&probe)));
        Ok(probe)
    }

    /// Records the finished rounds' results and hands them to the sink, in one
    /// transaction; a result whose monitor was updated or removed meanwhile is discarded.
    /// If the transaction fails (a busy database) the results wait for the next turn.
    fn record_rounds(&mut self) {
        if self.finished_rounds.is_empty() || self.record_retry.is_some_and(|t| Instant::now() < t)
        {
            return;
        }
        match self.try_record_rounds() {
            Ok(()) => {
                self.finished_rounds.clear();
                self.record_retry = None;
                self.db_free();
            }
            Err(e) => {
                self.sink.rolled_back();
                let retry = self.db_failed("recording monitor results", &e);
                self.record_retry = Some(Instant::now() + retry);
                let excess = self.finished_rounds.len().saturating_sub(MAX_UNRECORDED);
                if excess > 0 {
                    tracing::error!(
                        dropped = excess,
                        "dropping the oldest unrecorded monitor results: more than \
                         {MAX_UNRECORDED} wait for the database"
                    );
                    self.finished_rounds.drain(..excess);
                }
            }
        }
    }

    fn try_record_rounds(&mut self) -> Result<()> {
        let tx = self
            .books
            .transaction()
            .map_err(Error::sqlite("starting to record rounds"))?;
        let mut discarded = Vec::new();
        let mut recorded = Vec::new();
        for finished in &self.finished_rounds {
            let result = &finished.result;
            if monitor::store::record(&tx, result, &finished.state, finished.started_us)? {
                self.sink.stage(&tx, result)?;
                if self.live.is_some() {
                    recorded.push(result.clone());
                }
            } else {
                discarded.push((result.monitor.clone(), result.version));
            }
        }
        tx.commit()
            .map_err(Error::sqlite("committing rounds' results"))?;
        self.sink.committed()?;
        if let Some(live) = &self.live {
            for result in recorded {
                live.publish(LiveEvent::MonitorResult(Box::new(result)));
            }
        }
        for (monitor, version) in discarded {
            tracing::info!(
                monitor = %monitor,
                version,
                "discarded the result of a round of a monitor since updated or removed"
            );
            if self
                .probes
                .get(&monitor)
                .is_some_and(|(v, _)| *v == version)
            {
                self.probes.remove(&monitor);
            }
        }
        Ok(())
    }

    fn beat(&mut self) {
        self.next_beat = Instant::now() + HEARTBEAT_INTERVAL;
        let status = self.status_line();
        self.notifier.status(&status);
        let result = heartbeat::beat(
            &self.books,
            std::process::id(),
            self.running.len(),
            self.stop_deadline,
        );
        match result {
            Ok(()) => self.db_free(),
            Err(e) => {
                self.db_failed("writing the heartbeat", &e);
            }
        }
        self.publish_queue_figures();
        // A new pass: which records are the newest `--history-max-rows` is read again.
        self.prune_floor = None;
        self.prune_records();
        self.find_dead_foremen();
    }

    /// Another foreman on this database that stopped beating and whose process is gone
    /// (kill -9, a crash) leaves its running tasks' records `running`: they are `lost`
    /// (invariant 9), and its heartbeat row goes. Cheap while every foreman lives: one
    /// read of the few `foremen` rows a heartbeat.
    fn find_dead_foremen(&mut self) {
        let me = std::process::id();
        let result = (|| -> Result<()> {
            let dead = heartbeat::dead_foremen(&self.books, me)?;
            if dead.is_empty() {
                return Ok(());
            }
            let mut alive = heartbeat::live_foremen(&self.books, me)?;
            alive.push(me);
            let orphans = self.queue.rescue(&alive)?;
            if orphans.iter().any(|o| o.state == "queued") {
                self.maybe_due = true;
            }
            log_orphans(orphans);
            for pid in dead {
                heartbeat::unregister(&self.books, pid)?;
                tracing::warn!(
                    pid,
                    "a foreman on this database died; its running tasks are lost, or back \
                     in the queue if they have retries"
                );
            }
            Ok(())
        })();
        if let Err(e) = result {
            self.db_failed("looking for dead foremen", &e);
        }
    }

    /// Prunes one batch of `PRUNE_BATCH` task records past the retention in one short
    /// transaction; a full batch means more may be left, and the next batch follows after
    /// `PRUNE_PAUSE` (the loop serves tasks and enqueuers take the lock meanwhile). The
    /// heartbeat starts each pass; a failure waits for the next heartbeat.
    fn prune_records(&mut self) {
        let cutoff = now_micros() - micros_of(self.config.history_retention);
        let max_rows = i64::try_from(self.config.history_max_rows).unwrap_or(i64::MAX);
        let floor = match self.prune_floor {
            Some(floor) => floor,
            None => match records::oldest_of_newest(&self.books, max_rows) {
                Ok(floor) => *self.prune_floor.insert(floor),
                Err(e) => {
                    self.db_failed("pruning task records", &e);
                    self.next_prune = None;
                    return;
                }
            },
        };
        self.next_prune = match records::prune(&self.books, cutoff, floor, PRUNE_BATCH) {
            Ok(n) if n as i64 == PRUNE_BATCH => Some(Instant::now() + PRUNE_PAUSE),
            Ok(_) => None,
            Err(e) => {
                self.db_failed("pruning task records", &e);
                None
            }
        };
    }

    /// Hands tasks due and running to the telemetry sampler (at start, every heartbeat,
    /// and when stopping, so even a short run has them).
    fn publish_queue_figures(&self) {
        if let Some(telemetry) = &self.telemetry {
            match queue::count_due_capped(&self.books, now_micros(), DUE_COUNT_CAP) {
                Ok(due) => telemetry.queue.publish(due, self.running.len() as i64),
                Err(e) => tracing::warn!("could not count due tasks for telemetry: {e}"),
            }
        }
    }

    /// Invariants 2 and 3: no more claims; wait for running tasks up to the deadline.
    fn shut_down(&mut self, signal: i32) -> Result<Stopped> {
        let mut deadline = Instant::now() + self.config.graceful_timeout;
        // Set when running commands were told to stop at the deadline.
        let mut stopping_commands = false;
        // Said to `status` (the heartbeat row, written below) and the live page: stopping,
        // and by when.
        let stop_at = now_micros().saturating_add(micros_of(self.config.graceful_timeout));
        self.stop_deadline = Some(stop_at);
        if let Some(live) = &self.live {
            live.stopping(stop_at);
        }
        tracing::info!(
            signal,
            running = self.running.len(),
            "stopping: no new task starts; waiting up to {:.1} s for the running ones \
             (a second signal stops at once)",
            self.config.graceful_timeout.as_secs_f64()
        );
        // A broker's deliveries received and not started go back now, for other foremen.
        if let Err(e) = self.queue.stop_taking() {
            tracing::warn!(
                "could not hand back the tasks received and not started ({e}); the broker \
                 takes them back when the connection closes"
            );
        }
        self.beat();
        let status = self.status_line();
        self.notifier.stopping(&status);
        while !self.running.is_empty() {
            self.notifier.watchdog();
            let now = Instant::now();
            if now >= deadline {
                // Commands still running are stopped as a timeout stops them (SIGTERM to
                // their groups, SIGKILL `kill_after` later) and reported `abandoned` by
                // their workers; what is left after that is abandoned here.
                let commands = self.pool.as_ref().map_or(0, Pool::commands_running);
                match self.max_kill_after {
                    Some(kill_after) if commands > 0 && !stopping_commands => {
                        tracing::warn!(
                            commands,
                            "the graceful timeout passed: SIGTERM to the running commands' \
                             process groups, SIGKILL {:.1} s later if needed",
                            kill_after.as_secs_f64()
                        );
                        if let Some(pool) = &self.pool {
                            pool.stop_tasks();
                        }
                        stopping_commands = true;
                        deadline = now + kill_after + COMMAND_STOP_SLACK;
                        continue;
                    }
                    _ => return Ok(self.abandon("the graceful timeout passed")),
                }
            }
            if now >= self.next_beat {
                self.beat();
            }
            let mut wake = deadline.min(self.next_beat);
            if let Some(watchdog) = self.notifier.next_watchdog() {
                wake = wake.min(watchdog);
            }
            // Claimed jobs still queued behind a long one get a worker here too: a job
            // that never starts before the deadline would be a task lost (invariant 2).
            if let Some(attend) = self.pool.as_ref().and_then(Pool::attend) {
                wake = wake.min(attend);
            }
            let wait = wake.saturating_duration_since(now);
            select! {
                recv(self.done_rx) -> done => match done {
                    Ok(done) => {
                        self.finished(done);
                        self.settle_tasks();
                        self.record_rounds();
                    }
                    Err(_) => return Err(Error::Runtime("every worker thread died".into())),
                },
                recv(self.signal_rx) -> signal => match signal {
                    Ok(SIGHUP) => self.reload(),
                    _ => return Ok(self.abandon("a second signal came")),
                },
                default(wait) => {}
            }
        }
        Ok(Stopped::Gracefully)
    }

    fn abandon(&mut self, why: &str) -> Stopped {
        for (key, (name, started, lease)) in &self.running {
            let running_ms = round_ms(started.elapsed());
            match key {
                JobKey::Task(id) => {
                    tracing::warn!(
                        id,
                        task = name.as_str(),
                        running_ms,
                        "{why}: exiting with this task unfinished"
                    );
                    self.queue.settle(records::Finish {
                        id: *id,
                        state: "abandoned",
                        error: Some(format!("{why}: the foreman exited while it ran")),
                        at: now_micros(),
                        command: None,
                        retry: *lease,
                    });
                }
                JobKey::Round(monitor, version) => tracing::warn!(
                    monitor = monitor.as_str(),
                    version,
                    running_ms,
                    "{why}: exiting with this monitor round unfinished"
                ),
            }
        }
        self.settle_tasks();
        Stopped::Abandoned {
            tasks: self.running.len(),
        }
    }
}

/// Logs what became of the tasks of a foreman that died (`records::mark_lost`).
fn log_orphans(orphans: Vec<records::Orphan>) {
    for records::Orphan { id, task, state } in orphans {
        match state.as_str() {
            "queued" => tracing::warn!(
                id,
                %task,
                "task rescued: it was running when its foreman ended (kill -9, a crash, a \
                 power loss); it has retries, so it is back in the queue for its next attempt"
            ),
            "dead" => tracing::warn!(
                id,
                %task,
                "task dead: it was running its last attempt when its foreman ended"
            ),
            "abandoned" => tracing::warn!(
                id,
                %task,
                "task abandoned here: it was running when its foreman ended; it has retries, \
                 and the broker hands it out again"
            ),
            _ => tracing::warn!(
                id,
                %task,
                "task lost: it was running when its foreman ended (kill -9, a crash, a \
                 power loss); recorded as lost, not run again"
            ),
        }
    }
}
